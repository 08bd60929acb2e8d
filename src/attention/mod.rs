//! Attention over paged KV: dense decode and prefill, `merge_states`, RoPE utilities,
//! and an f64 reference used by tests.
//!
//! Conventions: queries are `[tokens, num_qo_heads, head_dim]` with `num_qo_heads` a
//! multiple of `num_kv_heads` (query head `h` reads KV head `h / (num_qo_heads / num_kv_heads)`);
//! the scale defaults to `1/sqrt(head_dim)`; the log-sum-exp is the natural log of
//! `sum_j exp(score_j)` over the (scaled, soft-capped) scores; a query with no keys gives a
//! zero output and an LSE of `-inf`.

pub mod reference;
pub mod rope;

mod decode;
mod kernel;
mod merge;
mod prefill;

pub use decode::{decode, decode_sparse};
pub use merge::merge_states;
pub use prefill::{prefill, prefill_sparse, StreamingWindow};
pub use rope::{apply_rope, RopeConfig, RopeStyle};

/// Defined with the other configuration types; re-exported here beside [`AttentionParams`].
pub use crate::config::PositionMode;

/// Per-KV-head token lists that sparse attention reads: for each KV head, strictly ascending
/// token indices of one sequence. The selection layer's `Selection` is the standard
/// implementation.
pub trait HeadTokens: Sync {
    fn num_kv_heads(&self) -> usize;
    /// Tokens in the sequence the lists index into.
    fn seq_len(&self) -> usize;
    fn head(&self, h: usize) -> &[u32];
}

/// Sparse attention takes a slice of token lists or of references to them, so callers pass
/// `&[Selection]` or `&[&Selection]` alike.
impl<T: HeadTokens + ?Sized> HeadTokens for &T {
    fn num_kv_heads(&self) -> usize {
        (**self).num_kv_heads()
    }
    fn seq_len(&self) -> usize {
        (**self).seq_len()
    }
    fn head(&self, h: usize) -> &[u32] {
        (**self).head(h)
    }
}

/// Parameters shared by decode and prefill.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionParams {
    /// Multiplier of q·k; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// If set to `c > 0`, scores become `c * tanh(score / c)` (after scaling).
    pub logit_soft_cap: Option<f32>,
    /// RoPE applied to keys when read. Required when the keys are stored before RoPE
    /// ([`crate::KeyRope::PreRope`]); each key is rotated by its slot's stored position.
    pub rope: Option<RopeConfig>,
    /// Tokens per work chunk for splitting long sequences across threads; `None` picks one.
    pub chunk_size: Option<usize>,
    /// Position numbering for RoPE at read time (pre-RoPE keys only).
    pub positions: PositionMode,
}
