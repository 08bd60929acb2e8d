//! Spans and position-free top-k: the retrieval that keeps text readable when positions are
//! renumbered (ReAttention).
//!
//! - [`expand_spans`] grows ranked hit tokens into spans of their neighbours, to a budget.
//! - [`raw_scores`] scores tokens of one KV head by `q·k` against the keys as stored
//!   (for keys stored before RoPE: the position-free score), the best of the group's rows.
//! - [`ranked_top`] ranks the best-scoring tokens, best first.

use rayon::prelude::*;

use crate::cpu::convert::load_row;
use crate::error::Result;
use crate::kv::PagedKv;
use crate::select::topk::{partition_top, rank_cmp};

/// The tokens of the span of `span` tokens around hit `t` in a sequence of `seq_len`
/// tokens: `t - (span - 1) / 2 ..= t + span / 2`, clipped to `0..seq_len`.
pub fn span_range(t: u32, span: usize, seq_len: usize) -> std::ops::Range<u32> {
    let before = (span.max(1) - 1) / 2;
    let after = span.max(1) / 2;
    let start = (t as usize).saturating_sub(before);
    let end = (t as usize).saturating_add(after).saturating_add(1).min(seq_len);
    start as u32..end.max(start) as u32
}

/// Expand `hits` (token indices, best first) into spans of `span` tokens
/// ([`span_range`]) and return the tokens taken, sorted ascending.
///
/// Hits are taken in order; each adds the tokens of its span that are neither taken yet
/// nor in `read_anyway` (sorted ascending: the sinks and window the head reads in any
/// case, which do not count), nearest to the hit first (a tie: the earlier token), until
/// `budget` tokens are taken. So the result holds at most `budget` tokens, every one
/// within `span / 2` of a hit, and a hit's whole span is taken before any token of a
/// later hit unless the budget runs out inside it. `span = 1` keeps the hits themselves.
/// Hits at or past `seq_len` are ignored.
///
/// Errors: `seq_len` above `u32::MAX` (token indices are u32); [`crate::Error::OutOfMemory`]
/// when the `seq_len` flags cannot be allocated.
pub fn expand_spans(hits: &[u32], span: usize, budget: usize, seq_len: usize, read_anyway: &[u32]) -> Result<Vec<u32>> {
    if seq_len > u32::MAX as usize {
        return Err(crate::Error::out_of_range(
            "seq_len",
            seq_len as i64,
            format!("0..={} (token indices are u32)", u32::MAX),
        ));
    }
    let mut taken = crate::alloc::filled_vec(seq_len, false, "span flags")?;
    let mut free = seq_len;
    for &t in read_anyway {
        if let Some(x) = taken.get_mut(t as usize) {
            free -= usize::from(!*x);
            *x = true;
        }
    }
    // Hits already expanded add nothing again.
    let mut expanded = crate::alloc::filled_vec(seq_len, false, "span flags")?;
    let limit = budget.min(free);
    let mut out = crate::alloc::vec_with_capacity(limit, "span tokens")?;
    'hits: for &t in hits {
        if out.len() >= limit {
            break;
        }
        if t as usize >= seq_len || expanded[t as usize] {
            continue;
        }
        expanded[t as usize] = true;
        let r = span_range(t, span, seq_len);
        // Nearest first: t, t-1, t+1, t-2, t+2, ...
        let reach = (t - r.start).max(r.end - 1 - t);
        for step in 0..=reach {
            for c in [t.checked_sub(step), if step > 0 { t.checked_add(step) } else { None }].into_iter().flatten() {
                if !r.contains(&c) || taken[c as usize] {
                    continue;
                }
                taken[c as usize] = true;
                out.push(c);
                if out.len() >= limit {
                    break 'hits;
                }
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A retrieval item's tokens from its ranked `hits`: their spans to `budget` with
/// `span = Some(S)`, else the first `budget` hits; sorted ascending.
pub(crate) fn hits_to_tokens(
    mut hits: Vec<u32>,
    span: Option<usize>,
    budget: usize,
    seq_len: usize,
    read_anyway: &[u32],
) -> Result<Vec<u32>> {
    match span {
        Some(s) => expand_spans(&hits, s, budget, seq_len, read_anyway),
        None => {
            hits.truncate(budget);
            hits.sort_unstable();
            Ok(hits)
        }
    }
}

/// `topk=budget` (with `span`) for KV head `h` of batch entry `b`: the best tokens outside
/// `read_anyway` by [`raw_scores`] against `rows`, grown into spans when `span` is set.
pub(crate) fn topk_tokens(
    kv: &PagedKv,
    b: usize,
    h: usize,
    rows: &[f32],
    budget: usize,
    span: Option<usize>,
    read_anyway: &[u32],
) -> Result<Vec<u32>> {
    let len = kv.seq_len(b);
    let cand = outside(len, read_anyway)?;
    let scores = raw_scores(kv, b, h, rows, &cand)?;
    let hits = ranked_top(&cand, &scores, budget)?;
    hits_to_tokens(hits, span, budget, len, read_anyway)
}

/// Score `tokens` of KV head `h` of batch entry `b` against `q` (`rows × head_dim` f32, the
/// query rows of the head's GQA group, already scaled or not as the caller wants): per
/// token the largest `q_r·k` over the rows, with `k` as stored.
pub(crate) fn raw_scores(kv: &PagedKv, b: usize, h: usize, q: &[f32], tokens: &[u32]) -> Result<Vec<f32>> {
    let d = kv.head_dim();
    let size = kv.dtype().size();
    let mut out = crate::alloc::filled_vec(tokens.len(), f32::NEG_INFINITY, "top-k scores")?;
    const CHUNK: usize = 1024;
    out.par_chunks_mut(CHUNK).zip(tokens.par_chunks(CHUNK)).for_each(|(o, ts)| {
        let mut k = vec![0f32; d];
        for (o, &t) in o.iter_mut().zip(ts) {
            let (page, slot) = kv.locate(b, t as usize);
            // SAFETY: `k_ptr` addresses a full key row of `d` elements of the view's dtype for
            // any token of the table (PagedKv's contract); `t` is below the sequence length.
            let bytes = unsafe { std::slice::from_raw_parts(kv.k_ptr(page, slot, h), d * size) };
            load_row(bytes, kv.dtype(), &mut k);
            *o = q
                .chunks_exact(d)
                .map(|r| r.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max);
        }
    });
    Ok(out)
}

/// The `k` best of `tokens` by `scores` (parallel arrays), best first (a higher score, then
/// the lower token).
pub(crate) fn ranked_top(tokens: &[u32], scores: &[f32], k: usize) -> Result<Vec<u32>> {
    let mut idx = crate::alloc::collect_n(tokens.len(), 0..tokens.len() as u32, "top-k ranking")?;
    let k = k.min(idx.len());
    partition_top(scores, &mut idx, k);
    idx.truncate(k);
    idx.sort_unstable_by(|&a, &b| rank_cmp(scores, a, b));
    Ok(idx.into_iter().map(|i| tokens[i as usize]).collect())
}

/// Tokens `0..seq_len` not in `read_anyway` (sorted ascending).
pub(crate) fn outside(seq_len: usize, read_anyway: &[u32]) -> Result<Vec<u32>> {
    let mut out = crate::alloc::vec_with_capacity(seq_len.saturating_sub(read_anyway.len()), "top-k candidates")?;
    let mut skip = read_anyway.iter().peekable();
    for t in 0..seq_len as u32 {
        while skip.peek().is_some_and(|&&s| s < t) {
            skip.next();
        }
        if skip.peek() != Some(&&t) {
            out.push(t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_centre_on_hits_and_stop_at_the_budget() {
        assert_eq!(span_range(10, 5, 100), 8..13);
        assert_eq!(span_range(10, 4, 100), 9..13);
        assert_eq!(span_range(1, 5, 100), 0..4);
        assert_eq!(span_range(98, 5, 100), 96..100);
        assert_eq!(span_range(7, 1, 100), 7..8);
        // Two hits, span 5, budget 7: the first span whole, then the second hit and its
        // nearest earlier neighbour.
        assert_eq!(expand_spans(&[10, 30], 5, 7, 100, &[]).unwrap(), vec![8, 9, 10, 11, 12, 29, 30]);
        // Overlap counts once; tokens read anyway are skipped and not counted.
        assert_eq!(expand_spans(&[10, 12], 5, 100, 100, &[9]).unwrap(), vec![8, 10, 11, 12, 13, 14]);
        assert_eq!(expand_spans(&[5], 3, 10, 100, &[]).unwrap(), vec![4, 5, 6]);
        assert!(expand_spans(&[5], 3, 0, 100, &[]).unwrap().is_empty());
        assert_eq!(expand_spans(&[200, 5], 1, 10, 100, &[]).unwrap(), vec![5]);
    }

    #[test]
    fn outside_skips_what_is_read_anyway() {
        assert_eq!(outside(8, &[0, 1, 6, 7]).unwrap(), vec![2, 3, 4, 5]);
        assert_eq!(outside(3, &[]).unwrap(), vec![0, 1, 2]);
    }
}
