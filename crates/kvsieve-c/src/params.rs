//! The attention parameter and RoPE structs of `attention.h` (`kvsieve_attention_params_t`,
//! `kvsieve_rope_config_t`, the `KVSIEVE_POSITIONS_*` position modes) and their conversion
//! to the core's types. Zero-initialised structs mean the defaults (except `theta`, which
//! has none).

use std::mem::{align_of, offset_of, size_of};

use kvsieve::attention::{AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::error::{Error, Result};

use super::args::read_struct;

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

const _: () = {
    assert!(size_of::<kvsieve_rope_config_t>() == 16 && align_of::<kvsieve_rope_config_t>() == 4);
    assert!(offset_of!(kvsieve_rope_config_t, rotary_dim) == 4);
    assert!(offset_of!(kvsieve_rope_config_t, style) == 8);
    assert!(offset_of!(kvsieve_rope_config_t, position_scale) == 12);
};

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_attention_params_t>() == 32 && align_of::<kvsieve_attention_params_t>() == 8);
    assert!(offset_of!(kvsieve_attention_params_t, logit_soft_cap) == 4);
    assert!(offset_of!(kvsieve_attention_params_t, rope) == 8);
    assert!(offset_of!(kvsieve_attention_params_t, chunk_size) == 16);
    assert!(offset_of!(kvsieve_attention_params_t, position_mode) == 24);
    assert!(offset_of!(kvsieve_attention_params_t, max_distance) == 28);
};

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

/// A RoPE configuration passed by pointer (required).
///
/// # Safety
/// 1. `rope` is NULL or points at a readable `kvsieve_rope_config_t`.
pub(crate) unsafe fn rope_config(rope: *const kvsieve_rope_config_t, param: &str) -> Result<RopeConfig> {
    read_struct(rope, param)?.to_core(param)
}

/// Attention parameters passed by pointer; NULL means all defaults.
///
/// # Safety
/// 1. `params` is NULL or points at a readable `kvsieve_attention_params_t`, whose `rope`
///    is NULL or points at a readable `kvsieve_rope_config_t`.
pub(crate) unsafe fn attention_params(params: *const kvsieve_attention_params_t) -> Result<AttentionParams> {
    if params.is_null() {
        return Ok(AttentionParams::default());
    }
    let p = read_struct(params, "params")?;
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
