//! Position-based selections: attention sinks plus a recent window (StreamingLLM) and the
//! LM-Infinite Λ-mask, plus the pages such a selection lets a cache evict.

use crate::error::{Error, Result};
use crate::select::selection::Selection;

/// `0..min(first, seq_len)` joined with `seq_len - min(last, seq_len)..seq_len`, ascending,
/// overlapping ranges merged.
/// Errors only when the list cannot be allocated.
pub(crate) fn first_and_last(seq_len: usize, first: usize, last: usize) -> Result<Vec<u32>> {
    let head_end = first.min(seq_len);
    let tail_start = seq_len - last.min(seq_len);
    let n = head_end + (seq_len - tail_start.max(head_end));
    let mut tokens = crate::alloc::vec_with_capacity(n, "selection indices")?;
    tokens.extend(0..head_end as u32);
    tokens.extend(tail_start.max(head_end) as u32..seq_len as u32);
    Ok(tokens)
}

fn check_seq_len(seq_len: usize) -> Result<()> {
    if seq_len > u32::MAX as usize {
        return Err(Error::out_of_range(
            "seq_len",
            seq_len as i64,
            format!("0..={} (token indices are u32)", u32::MAX),
        ));
    }
    Ok(())
}

/// StreamingLLM: every head reads the first `sinks` tokens (attention sinks) and the last
/// `window` tokens. The two ranges merge when they overlap; a sequence shorter than
/// `sinks + window` is read whole.
///
/// Errors: `window` 0 (the query would not see its own recent context), `num_kv_heads` 0.
/// `sinks` 0 is allowed (a plain sliding window).
pub fn streaming(num_kv_heads: usize, seq_len: usize, sinks: usize, window: usize) -> Result<Selection> {
    if window == 0 {
        return Err(Error::invalid(
            "window",
            "at least 1 recent token (window = 0 would hide the query's own context)",
        ));
    }
    check_seq_len(seq_len)?;
    Selection::same_for_all_heads_unchecked(num_kv_heads, seq_len, first_and_last(seq_len, sinks, window)?)
}

/// LM-Infinite's Λ-shaped mask, for the last query of the sequence: every head reads the
/// first `global` tokens and the last `local` tokens. (Attention then caps relative
/// distances with [`crate::config::PositionMode::Capped`].)
///
/// Errors: `local` 0, `num_kv_heads` 0. `global` 0 is allowed.
pub fn lambda(num_kv_heads: usize, seq_len: usize, global: usize, local: usize) -> Result<Selection> {
    if local == 0 {
        return Err(Error::invalid("local", "at least 1 recent token (local = 0 would hide the query's own context)"));
    }
    check_seq_len(seq_len)?;
    Selection::same_for_all_heads_unchecked(num_kv_heads, seq_len, first_and_last(seq_len, global, local)?)
}

/// Pages of a sequence that a sinks + window selection never reads again: indices into
/// the sequence's page list (ascending) of the pages whose tokens all lie outside both the
/// first `sinks` tokens and the last `window` tokens. Pass them to
/// [`crate::KvCache::evict_pages`]; the remaining tokens keep their original positions.
///
/// Tokens past the window only move further away as the sequence grows, so a page
/// listed here stays unneeded. The page holding the last token is never listed.
///
/// Errors: `page_size` 0, `window` 0.
pub fn window_pages_to_evict(seq_len: usize, page_size: usize, sinks: usize, window: usize) -> Result<Vec<usize>> {
    if page_size == 0 {
        return Err(Error::invalid("page_size", "at least 1"));
    }
    if window == 0 {
        return Err(Error::invalid("window", "at least 1 recent token"));
    }
    // Pages entirely at or after `sinks` and entirely before `seq_len - window`.
    let first = sinks.div_ceil(page_size);
    let tail_start = seq_len.saturating_sub(window);
    let end = tail_start / page_size;
    let pages = first..end.max(first);
    crate::alloc::collect_n(pages.len(), pages, "pages")
}
