//! The attention parameter and RoPE structs of `attention.h` (`kvsieve_attention_params_t`,
//! `kvsieve_rope_config_t`, the `KVSIEVE_POSITIONS_*` position modes) and their conversion
//! to the core's types. Both structs are versioned (`struct_size` first, see
//! `args::Versioned`); zero fields mean the defaults (except `theta`, which has none).

use std::mem::{align_of, offset_of, size_of};

use kvsieve::attention::{AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::error::{Error, Result};

use super::args::{read_versioned, read_versioned_opt, sizes_are_valid, Versioned};

/// `KVSIEVE_POSITIONS_ORIGINAL`.
pub const POSITIONS_ORIGINAL: u32 = 0;

/// `KVSIEVE_POSITIONS_CONTIGUOUS`.
pub const POSITIONS_CONTIGUOUS: u32 = 1;

/// `KVSIEVE_POSITIONS_CAPPED`.
pub const POSITIONS_CAPPED: u32 = 2;

/// RoPE parameters (see `kvsieve_rope_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kvsieve_rope_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    /// Base of the inverse frequencies (e.g. 10000).
    pub theta: f32,
    /// Rotated channels, even; 0 means all of head_dim.
    pub rotary_dim: u32,
    /// `KVSIEVE_ROPE_HALF_SPLIT` (0) or `KVSIEVE_ROPE_ADJACENT_PAIRS` (1).
    pub style: u32,
    /// Positions are divided by this; 0 means 1 (no scaling).
    pub position_scale: f32,
}

/// Parameters of decode and prefill (see `kvsieve_attention_params_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvsieve_attention_params_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    /// Multiplier of q·k; 0 means 1/sqrt(head_dim).
    pub scale: f32,
    /// Soft cap `c`: scores become `c * tanh(score / c)`; 0 means off.
    pub logit_soft_cap: f32,
    /// RoPE applied to keys when read (required for pre-RoPE keys); NULL for none.
    pub rope: *const kvsieve_rope_config_t,
    /// Tokens per work chunk; 0 picks one.
    pub chunk_size: usize,
    /// How positions are numbered when RoPE is applied at read time:
    /// `KVSIEVE_POSITIONS_ORIGINAL` (0), `KVSIEVE_POSITIONS_CONTIGUOUS` (1) or
    /// `KVSIEVE_POSITIONS_CAPPED` (2).
    pub position_mode: u32,
    /// Largest relative distance for `KVSIEVE_POSITIONS_CAPPED`; ignored otherwise.
    pub max_distance: u32,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_rope_config_t>() == 24 && align_of::<kvsieve_rope_config_t>() == 8);
    assert!(offset_of!(kvsieve_rope_config_t, theta) == 8);
    assert!(offset_of!(kvsieve_rope_config_t, rotary_dim) == 12);
    assert!(offset_of!(kvsieve_rope_config_t, style) == 16);
    assert!(offset_of!(kvsieve_rope_config_t, position_scale) == 20);
    assert!(size_of::<kvsieve_attention_params_t>() == 40 && align_of::<kvsieve_attention_params_t>() == 8);
    assert!(offset_of!(kvsieve_attention_params_t, scale) == 8);
    assert!(offset_of!(kvsieve_attention_params_t, logit_soft_cap) == 12);
    assert!(offset_of!(kvsieve_attention_params_t, rope) == 16);
    assert!(offset_of!(kvsieve_attention_params_t, chunk_size) == 24);
    assert!(offset_of!(kvsieve_attention_params_t, position_mode) == 32);
    assert!(offset_of!(kvsieve_attention_params_t, max_distance) == 36);
};

const _: () = {
    assert!(offset_of!(kvsieve_rope_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_rope_config_t>());
    assert!(
        offset_of!(kvsieve_attention_params_t, struct_size) == 0 && sizes_are_valid::<kvsieve_attention_params_t>()
    );
};

impl kvsieve_rope_config_t {
    /// What the header's `kvsieve_rope_config_init()` gives: every field zero (`theta`
    /// must still be set), `struct_size` this layout's.
    pub fn init() -> Self {
        kvsieve_rope_config_t {
            struct_size: size_of::<Self>(),
            theta: 0.0,
            rotary_dim: 0,
            style: 0,
            position_scale: 0.0,
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_rope_config_t {
    const NAME: &'static str = "kvsieve_rope_config_t";
    const INIT: &'static str = "kvsieve_rope_config_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

impl kvsieve_attention_params_t {
    /// What the header's `kvsieve_attention_params_init()` gives: every default (all zero,
    /// no RoPE), `struct_size` this layout's.
    pub fn init() -> Self {
        kvsieve_attention_params_t {
            struct_size: size_of::<Self>(),
            scale: 0.0,
            logit_soft_cap: 0.0,
            rope: std::ptr::null(),
            chunk_size: 0,
            position_mode: POSITIONS_ORIGINAL,
            max_distance: 0,
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_attention_params_t {
    const NAME: &'static str = "kvsieve_attention_params_t";
    const INIT: &'static str = "kvsieve_attention_params_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

impl kvsieve_rope_config_t {
    /// The core configuration. `param` names the struct in messages. Values are checked
    /// against a head_dim by the core where it is known.
    pub(crate) fn to_core(self, param: &str) -> Result<RopeConfig> {
        let style = match self.style {
            0 => RopeStyle::HalfSplit,
            1 => RopeStyle::AdjacentPairs,
            s => {
                return Err(Error::invalid(
                    format!("{param}.style"),
                    format!("KVSIEVE_ROPE_HALF_SPLIT (0) or KVSIEVE_ROPE_ADJACENT_PAIRS (1), got {s}"),
                ))
            }
        };
        let position_scale = if self.position_scale == 0.0 { 1.0 } else { self.position_scale };
        Ok(RopeConfig { theta: self.theta, rotary_dim: self.rotary_dim as usize, style, position_scale })
    }
}

/// A RoPE configuration passed by pointer (required), read as its `struct_size` states.
///
/// # Safety
/// 1. `rope` is NULL or points at a readable `kvsieve_rope_config_t` of its `struct_size`.
pub(crate) unsafe fn rope_config(rope: *const kvsieve_rope_config_t, param: &str) -> Result<RopeConfig> {
    read_versioned(rope, param)?.to_core(param)
}

/// Attention parameters passed by pointer; NULL means all defaults.
///
/// # Safety
/// 1. `params` is NULL or points at a readable `kvsieve_attention_params_t` of its
///    `struct_size`, whose `rope` is NULL or points at a readable `kvsieve_rope_config_t`
///    of its own `struct_size`.
pub(crate) unsafe fn attention_params(params: *const kvsieve_attention_params_t) -> Result<AttentionParams> {
    let Some(p) = read_versioned_opt(params, "params")? else {
        return Ok(AttentionParams::default());
    };
    let rope = if p.rope.is_null() { None } else { Some(rope_config(p.rope, "rope")?) };
    let positions = match p.position_mode {
        POSITIONS_ORIGINAL => PositionMode::Original,
        POSITIONS_CONTIGUOUS => PositionMode::Contiguous,
        POSITIONS_CAPPED => PositionMode::Capped { max_distance: p.max_distance },
        m => {
            return Err(Error::invalid(
                "position_mode",
                format!("KVSIEVE_POSITIONS_ORIGINAL (0), KVSIEVE_POSITIONS_CONTIGUOUS (1) or KVSIEVE_POSITIONS_CAPPED (2), got {m}"),
            ))
        }
    };
    Ok(AttentionParams {
        scale: (p.scale != 0.0).then_some(p.scale),
        logit_soft_cap: (p.logit_soft_cap != 0.0).then_some(p.logit_soft_cap),
        rope,
        chunk_size: (p.chunk_size != 0).then_some(p.chunk_size),
        positions,
    })
}
