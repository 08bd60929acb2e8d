//! Rotary position embedding (RoPE).

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::TensorViewMut;

/// How channels are paired for rotation.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Channel `i` pairs with `i + rotary_dim/2` (GPT-NeoX, HF Llama).
    HalfSplit = 0,
    /// Channel `2i` pairs with `2i + 1` (GPT-J, GGUF / llama.cpp Llama).
    AdjacentPairs = 1,
}

/// RoPE parameters. Pair `i` (0 <= i < rotary_dim/2) rotates by angle
/// `(position / position_scale) * theta^(-2i / rotary_dim)`; channels past `rotary_dim`
/// are left unchanged (partial rotary).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    /// Rotated channels; 0 means all of head_dim. Must be even.
    pub rotary_dim: usize,
    pub style: RopeStyle,
    /// Linear position scaling: positions are divided by this (1.0 = none).
    pub position_scale: f32,
}

impl RopeConfig {
    pub fn new(theta: f32, style: RopeStyle) -> Self {
        RopeConfig { theta, rotary_dim: 0, style, position_scale: 1.0 }
    }

    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Self {
        self.rotary_dim = rotary_dim;
        self
    }

    /// Rotated channels for a given head_dim.
    pub fn rotary_dim_for(&self, head_dim: usize) -> usize {
        if self.rotary_dim == 0 {
            head_dim
        } else {
            self.rotary_dim
        }
    }

    /// Check the parameters against a head_dim.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(Error::invalid("rope.theta", format!("a finite value > 1, got {}", self.theta)));
        }
        if !(self.position_scale.is_finite() && self.position_scale > 0.0) {
            return Err(Error::invalid(
                "rope.position_scale",
                format!("a finite value > 0, got {}", self.position_scale),
            ));
        }
        let r = self.rotary_dim_for(head_dim);
        if !r.is_multiple_of(2) || r > head_dim {
            return Err(Error::invalid(
                "rope.rotary_dim",
                format!("an even number <= head_dim {head_dim} (0 = all), got {}", self.rotary_dim),
            ));
        }
        Ok(())
    }

    /// Inverse frequencies `theta^(-2i / rotary_dim)`, one per rotated pair.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let r = self.rotary_dim_for(head_dim);
        (0..r / 2).map(|i| (self.theta as f64).powf(-2.0 * i as f64 / r as f64) as f32).collect()
    }

    /// Rotate one head vector in place by `position`, given precomputed `inv_freq`.
    #[inline]
    pub fn rotate(&self, x: &mut [f32], position: f32, inv_freq: &[f32]) {
        let half = inv_freq.len();
        let p = (position / self.position_scale) as f64;
        for (i, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (p * f as f64).sin_cos();
            let (sin, cos) = (sin as f32, cos as f32);
            let (a, b) = match self.style {
                RopeStyle::HalfSplit => (i, i + half),
                RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
            };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * cos - xb * sin;
            x[b] = xa * sin + xb * cos;
        }
    }
}

/// Rotations at integer positions `0..len` for one RoPE configuration and head_dim: the
/// cos and sin of every rotated pair, computed exactly as [`RopeConfig::rotate`] does, so
/// rotating through the table gives the same bits. Keys stored before RoPE are rotated at
/// every read; the table turns the per-pair `sin_cos` into a lookup.
#[derive(Debug)]
pub(crate) struct RopeTable {
    half: usize,
    len: usize,
    /// `[len][cos | sin][half]`: per position the cos of every pair, then the sin.
    cs: Vec<f32>,
}

/// Longest table kept (positions beyond it are rotated by computing `sin_cos`).
const TABLE_MAX_POSITIONS: usize = 1 << 16;

impl RopeTable {
    fn build(cfg: &RopeConfig, inv_freq: &[f32], len: usize) -> Self {
        let half = inv_freq.len();
        let mut cs = vec![0f32; len * 2 * half];
        cs.par_chunks_mut((2 * half).max(1)).enumerate().for_each(|(pos, row)| {
            cfg.rotation_row(pos as f32, inv_freq, row);
        });
        RopeTable { half, len, cs }
    }
}

/// The shared tables, by (theta, rotary dim, position scale) bits.
type Tables = parking_lot::Mutex<std::collections::HashMap<(u32, usize, u32), Arc<RopeTable>>>;

impl RopeConfig {
    /// A table covering positions `0..len` (rounded up to a power of two, at most
    /// [`TABLE_MAX_POSITIONS`]), shared by every call with the same configuration; built
    /// once per size (in parallel).
    pub(crate) fn table(&self, head_dim: usize, len: usize) -> Arc<RopeTable> {
        static TABLES: OnceLock<Tables> = OnceLock::new();
        let want = len.max(1).next_power_of_two().min(TABLE_MAX_POSITIONS);
        let key = (self.theta.to_bits(), self.rotary_dim_for(head_dim), self.position_scale.to_bits());
        let tables = TABLES.get_or_init(Default::default);
        if let Some(t) = tables.lock().get(&key).filter(|t| t.len >= want) {
            return t.clone();
        }
        let t = Arc::new(RopeTable::build(self, &self.inv_freq(head_dim), want));
        let mut g = tables.lock();
        let keep = g.get(&key).filter(|old| old.len >= t.len).cloned().unwrap_or_else(|| t.clone());
        g.insert(key, keep.clone());
        keep
    }

    /// [`RopeConfig::rotate`] through `table` when `position` is an integer it covers (the
    /// same result), computing otherwise.
    #[inline]
    pub(crate) fn rotate_with(&self, x: &mut [f32], position: f32, inv_freq: &[f32], table: &RopeTable) {
        let i = position as usize;
        if position < 0.0 || i as f32 != position || i >= table.len || table.half != inv_freq.len() {
            return self.rotate(x, position, inv_freq);
        }
        let half = table.half;
        let (cos, sin) = table.cs[i * 2 * half..(i + 1) * 2 * half].split_at(half);
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU has AVX2 (checked); the loop is plain arithmetic on slices.
            return unsafe { rotate_pairs_avx2(self.style, x, cos, sin) };
        }
        rotate_pairs(self.style, x, cos, sin);
    }
}

impl RopeTable {
    /// The rotation of integer position `position` as `2 * half` floats (the cos of every
    /// pair, then the sin), if the table covers it.
    #[inline]
    pub(crate) fn row(&self, position: f32) -> Option<&[f32]> {
        let i = position as usize;
        if position < 0.0 || i as f32 != position || i >= self.len {
            return None;
        }
        Some(&self.cs[i * 2 * self.half..(i + 1) * 2 * self.half])
    }
}

impl RopeConfig {
    /// The cos and sin [`RopeConfig::rotate`] uses at `position` for every pair, into `out`
    /// (`2 * inv_freq.len()` floats: every cos, then every sin), as a table row holds them.
    pub(crate) fn rotation_row(&self, position: f32, inv_freq: &[f32], out: &mut [f32]) {
        let p = (position / self.position_scale) as f64;
        let (cos, sin) = out.split_at_mut(inv_freq.len());
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
            let (sn, cs) = (p * f as f64).sin_cos();
            *c = cs as f32;
            *s = sn as f32;
        }
    }
}

/// Rotate the pairs of `x` by `cos` and `sin`, one of each per pair. Separate multiplies and
/// adds (no FMA), so every instruction set gives the same bits.
#[inline(always)]
fn rotate_pairs(style: RopeStyle, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let row = cos.iter().zip(sin);
    match style {
        RopeStyle::HalfSplit => {
            let (lo, hi) = x.split_at_mut(cos.len());
            for ((a, b), (&cos, &sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                let (xa, xb) = (*a, *b);
                *a = xa * cos - xb * sin;
                *b = xa * sin + xb * cos;
            }
        }
        RopeStyle::AdjacentPairs => {
            for (pair, (&cos, &sin)) in x.chunks_exact_mut(2).zip(row) {
                let (xa, xb) = (pair[0], pair[1]);
                pair[0] = xa * cos - xb * sin;
                pair[1] = xa * sin + xb * cos;
            }
        }
    }
}

/// [`rotate_pairs`] compiled for AVX2 (256-bit vectors instead of the baseline's 128-bit).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rotate_pairs_avx2(style: RopeStyle, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    rotate_pairs(style, x, cos, sin)
}

/// Apply RoPE in place to `x` of shape `[n, heads, head_dim]`, token `i` at `positions[i]`.
pub fn apply_rope(x: &mut TensorViewMut, positions: &[i32], cfg: &RopeConfig) -> Result<()> {
    if x.shape().len() != 3 {
        return Err(Error::shape("x", "[n, heads, head_dim]", format!("{:?}", x.shape())));
    }
    let (n, h, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if positions.len() != n {
        return Err(Error::shape("positions", format!("[{n}]"), format!("[{}]", positions.len())));
    }
    cfg.validate(d)?;
    let inv = cfg.inv_freq(d);
    let longest = positions.iter().map(|&p| p.max(0) as usize).max().unwrap_or(0);
    let table = cfg.table(d, longest + 1);
    let mut row = vec![0f32; d];
    for (i, &pos) in positions.iter().enumerate() {
        for head in 0..h {
            x.as_view().read_row(&[i, head], &mut row);
            cfg.rotate_with(&mut row, pos as f32, &inv, &table);
            x.write_row(&[i, head], &row);
        }
    }
    Ok(())
}

#[cfg(test)]
mod table_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Rotating through the shared table gives exactly the bits of computing each
        /// rotation, for both pairings, partial rotary dims, scaled positions, and positions
        /// inside, at the edge of and past the table (and fractional ones).
        #[test]
        fn table_rotation_equals_computed_rotation(
            seed in any::<u64>(), half_split in any::<bool>(), d in prop_oneof![Just(8usize), Just(64), Just(128)],
            partial in any::<bool>(), scale in prop_oneof![Just(1.0f32), Just(4.0)], theta in prop_oneof![Just(10_000.0f32), Just(500_000.0)],
        ) {
            let style = if half_split { RopeStyle::HalfSplit } else { RopeStyle::AdjacentPairs };
            let cfg = RopeConfig { theta, rotary_dim: if partial { d / 2 } else { 0 }, style, position_scale: scale };
            let inv = cfg.inv_freq(d);
            let table = cfg.table(d, 300);
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
            for pos in [0.0f32, 1.0, 17.0, 255.0, 511.0, 512.0, 70_000.0, 2.5, (next() % 1000) as f32] {
                let x: Vec<f32> = (0..d).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
                let (mut a, mut b) = (x.clone(), x);
                cfg.rotate(&mut a, pos, &inv);
                cfg.rotate_with(&mut b, pos, &inv, &table);
                prop_assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "position {}", pos);
            }
        }
    }
}
