//! Rotary position embedding (RoPE).

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
            return Err(Error::invalid("rope.position_scale", format!("a finite value > 0, got {}", self.position_scale)));
        }
        let r = self.rotary_dim_for(head_dim);
        if r % 2 != 0 || r > head_dim {
            return Err(Error::invalid("rope.rotary_dim", format!("an even number <= head_dim {head_dim} (0 = all), got {}", self.rotary_dim)));
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
    let mut row = vec![0f32; d];
    for (i, &pos) in positions.iter().enumerate() {
        for head in 0..h {
            x.as_view().read_row(&[i, head], &mut row);
            cfg.rotate(&mut row, pos as f32, &inv);
            x.write_row(&[i, head], &row);
        }
    }
    Ok(())
}
