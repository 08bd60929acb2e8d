//! Page-bound selection (Quest): rank a sequence's pages by an upper bound of the query's
//! attention logits over each page, and keep the best pages up to a token budget.
//!
//! # The bound
//! Each page of a [`KvCache`] keeps, per layer and KV head, the per-channel minimum `m` and
//! maximum `M` of its written keys. For any key `k` of the page, `q·k = sum_i q_i k_i <=
//! sum_i max(q_i M_i, q_i m_i)`, so that sum bounds every logit of the page from above.
//! A page with no written slot scores `-inf`.
//!
//! # GQA
//! The query heads of a GQA group share one selection, so a page's score for a KV head is
//! the **maximum** of the group's per-query-head bounds: it bounds the largest logit any
//! head of the group can reach on that page, and a page is needed as soon as one head
//! may attend to it strongly. A sum or mean over heads would let one head's large bounds
//! hide a page that only another head needs (and would no longer bound any logit).
//!
//! # Budget
//! Per KV head, pages are taken best first (higher score, then lower page index) while
//! the tokens kept so far are fewer than `budget_tokens`, counting each page's real token
//! count (the last page may be partial), so the kept tokens reach the budget and exceed it
//! by less than one page. At least `min_pages` pages are kept (capped at the number of
//! pages). A sequence no longer than the budget is kept whole: a growing sequence starts
//! below any budget and must not fail, so a budget larger than the context is not an error.

use rayon::prelude::*;

use crate::config::KeyRope;
use crate::cpu::bounds::{score_block, BoundsLayout};
use crate::error::{Error, Result};
use crate::kv::{KeyBoundsRef, KvCache, SeqId};
use crate::select::keys::read_query;
use crate::select::selection::Selection;
use crate::select::topk::{partition_top, rank_cmp};
use crate::tensor::TensorView;

/// Settings of page-bound selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageBoundsConfig {
    /// Tokens to keep per KV head (at least 1); see the module docs for how the last page
    /// counts.
    pub budget_tokens: usize,
    /// Pages kept per KV head whatever the budget (capped at the sequence's page count).
    pub min_pages: usize,
}

impl PageBoundsConfig {
    /// A budget of `budget_tokens` tokens per KV head, no page minimum.
    pub fn new(budget_tokens: usize) -> Self {
        PageBoundsConfig { budget_tokens, min_pages: 0 }
    }

    /// Keep at least `min_pages` pages per KV head.
    pub fn with_min_pages(mut self, min_pages: usize) -> Self {
        self.min_pages = min_pages;
        self
    }

    /// Errors if `budget_tokens` is 0.
    pub fn validate(&self) -> Result<()> {
        if self.budget_tokens == 0 {
            return Err(Error::invalid("budget_tokens", "at least 1 token"));
        }
        Ok(())
    }
}

/// Pages per parallel task, and the least work (pages x query heads x head_dim) worth
/// splitting across threads.
const BLOCK_PAGES: usize = 128;
const PARALLEL_WORK: usize = 1 << 20;

/// Page-bound scores of `pages` (page ids into the pool the bounds describe) for one
/// decode query, `[num_kv_heads][pages.len()]` row-major.
///
/// `q` is `[num_qo_heads, head_dim]` row-major, with query head `h` in KV head
/// `h / (num_qo_heads / num_kv_heads)`'s group. Score of page `p` for KV head `g`: the
/// largest over the group's query heads of `sum_i max(q_i M_i, q_i m_i)` (see the module
/// docs), or `-inf` for a page with no written slot. Uses AVX2/FMA/F16C when the CPU has
/// them and threads for large inputs.
///
/// Errors: `num_qo_heads` not a positive multiple of `bounds.num_kv_heads`, `q` not
/// `num_qo_heads * head_dim` long, a page id past the pool.
pub fn page_scores(bounds: KeyBoundsRef, pages: &[u32], q: &[f32], num_qo_heads: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; pages.len() * bounds.num_kv_heads];
    page_scores_into(bounds, pages, q, num_qo_heads, &mut out)?;
    Ok(out)
}

/// [`page_scores`] into a caller-provided buffer of `num_kv_heads * pages.len()` floats.
pub fn page_scores_into(
    bounds: KeyBoundsRef,
    pages: &[u32],
    q: &[f32],
    num_qo_heads: usize,
    out: &mut [f32],
) -> Result<()> {
    let (hk, d) = (bounds.num_kv_heads, bounds.head_dim);
    if hk == 0 || d == 0 {
        return Err(Error::invalid("bounds", format!("num_kv_heads >= 1 and head_dim >= 1, got {hk} and {d}")));
    }
    if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(hk) {
        return Err(Error::invalid(
            "num_qo_heads",
            format!("a positive multiple of num_kv_heads ({hk}), got {num_qo_heads}"),
        ));
    }
    if q.len() != num_qo_heads * d {
        return Err(Error::shape(
            "q",
            format!("[num_qo_heads * head_dim] = [{}]", num_qo_heads * d),
            format!("[{}]", q.len()),
        ));
    }
    let np = pages.len();
    if out.len() != hk * np {
        return Err(Error::shape(
            "out",
            format!("[num_kv_heads * num_pages] = [{}]", hk * np),
            format!("[{}]", out.len()),
        ));
    }
    let layout = BoundsLayout {
        bytes: bounds.bytes,
        dtype: bounds.dtype,
        num_kv_heads: hk,
        head_dim: d,
        group: num_qo_heads / hk,
    };
    let pool = layout.num_pages();
    if let Some(i) = pages.iter().position(|&p| p as usize >= pool) {
        return Err(Error::out_of_range(
            format!("pages[{i}]"),
            pages[i] as i64,
            format!("0..{pool} (pages the bounds hold)"),
        ));
    }
    // Kernels write [page][head]; transpose into [head][page].
    let mut by_page = vec![0f32; np * hk];
    if np * num_qo_heads * d >= PARALLEL_WORK && rayon::current_num_threads() > 1 {
        by_page
            .par_chunks_mut(BLOCK_PAGES * hk)
            .zip(pages.par_chunks(BLOCK_PAGES))
            .for_each(|(o, ps)| score_block(&layout, ps, q, o));
    } else {
        score_block(&layout, pages, q, &mut by_page);
    }
    for (j, row) in by_page.chunks_exact(hk).enumerate() {
        for (h, &s) in row.iter().enumerate() {
            out[h * np + j] = s;
        }
    }
    Ok(())
}

/// Page indices (into a sequence's page list, ascending) that page-bound selection keeps
/// for one KV head, given that head's page `scores` (one per page, as from
/// [`page_scores`]): best first (higher score, then lower index; NaN counts as `-inf`)
/// until the kept pages hold at least `budget_tokens` tokens, and at least `min_pages`
/// pages. Page `p` holds `min(page_size, seq_len - p * page_size)` tokens.
///
/// Errors: an invalid `cfg`, `page_size` 0, or `scores.len()` not `ceil(seq_len / page_size)`.
pub fn pages_to_keep(scores: &[f32], page_size: usize, seq_len: usize, cfg: &PageBoundsConfig) -> Result<Vec<u32>> {
    cfg.validate()?;
    if page_size == 0 {
        return Err(Error::invalid("page_size", "at least 1"));
    }
    let n = seq_len.div_ceil(page_size);
    if scores.len() != n {
        return Err(Error::shape(
            "scores",
            format!("[ceil(seq_len / page_size)] = [{n}]"),
            format!("[{}]", scores.len()),
        ));
    }
    if n > u32::MAX as usize {
        return Err(Error::invalid("seq_len", "at most u32::MAX pages"));
    }
    Ok(keep(scores, page_size, seq_len, cfg))
}

/// [`pages_to_keep`] on validated arguments.
fn keep(scores: &[f32], page_size: usize, seq_len: usize, cfg: &PageBoundsConfig) -> Vec<u32> {
    let n = scores.len();
    let tokens = |p: u32| page_size.min(seq_len - p as usize * page_size);
    let mut idx: Vec<u32> = (0..n as u32).collect();
    // Every page holds at most page_size tokens: at least this many pages are needed.
    let mut k = cfg.budget_tokens.div_ceil(page_size).min(n);
    partition_top(scores, &mut idx, k);
    let mut kept: usize = idx[..k].iter().map(|&p| tokens(p)).sum();
    // Only the partial last page can leave the budget short; take the next best pages.
    while kept < cfg.budget_tokens && k < n {
        let best = (k..n).min_by(|&a, &b| rank_cmp(scores, idx[a], idx[b])).expect("k < n");
        idx.swap(k, best);
        kept += tokens(idx[k]);
        k += 1;
    }
    let floor = cfg.min_pages.min(n);
    if k < floor {
        partition_top(scores, &mut idx[k..], floor - k);
        k = floor;
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Token indices of the given ascending pages, clipped to `seq_len`, appended to `out`.
pub(crate) fn page_tokens(pages: &[u32], page_size: usize, seq_len: usize, out: &mut Vec<u32>) {
    for &p in pages {
        let s = p as usize * page_size;
        out.extend(s as u32..(s + page_size).min(seq_len) as u32);
    }
}

/// Page scores of one sequence at one layer, ready for per-head ranking.
pub(crate) struct SeqPageScores {
    /// `[num_kv_heads][num_pages]`.
    pub scores: Vec<f32>,
    pub num_pages: usize,
    pub page_size: usize,
    pub seq_len: usize,
}

impl SeqPageScores {
    /// Scores of KV head `h`, one per page.
    pub fn head(&self, h: usize) -> &[f32] {
        &self.scores[h * self.num_pages..(h + 1) * self.num_pages]
    }

    /// Every token of the sequence as a hit for spans (`span=`), page by page in the rank
    /// order of head `h`'s pages (within a page, in order). A sequence that was not scored
    /// (no longer than the budget) lists its tokens in order.
    pub fn ranked_page_hits(&self, h: usize) -> crate::error::Result<Vec<u32>> {
        let mut out = crate::alloc::vec_with_capacity(self.seq_len, "page hits")?;
        if self.num_pages == 0 {
            out.extend(0..self.seq_len as u32);
            return Ok(out);
        }
        let scores = self.head(h);
        let mut pages = crate::alloc::collect_n(self.num_pages, 0..self.num_pages as u32, "page ranking")?;
        pages.sort_unstable_by(|&a, &b| rank_cmp(scores, a, b));
        page_tokens(&pages, self.page_size, self.seq_len, &mut out);
        Ok(out)
    }

    /// Token indices page-bound selection keeps for KV head `h`.
    pub fn keep_tokens(&self, h: usize, cfg: &PageBoundsConfig) -> Vec<u32> {
        let mut out = Vec::new();
        if self.seq_len <= cfg.budget_tokens {
            out.extend(0..self.seq_len as u32);
        } else {
            page_tokens(&keep(self.head(h), self.page_size, self.seq_len, cfg), self.page_size, self.seq_len, &mut out);
        }
        out
    }
}

/// Check that page bounds apply to `cache` at `layer`, and return them.
pub(crate) fn usable_bounds(cache: &KvCache, layer: usize) -> Result<KeyBoundsRef<'_>> {
    let bounds = cache.key_bounds(layer)?;
    if cache.key_rope() == KeyRope::PreRope {
        return Err(Error::invalid(
            "key_rope",
            "keys stored after RoPE (KeyRope::PostRope): bounds over unrotated keys do not bound the rotated keys attention reads",
        ));
    }
    Ok(bounds)
}

/// Score every page of sequence `seq` at `layer` for the decode query `q`.
/// `skip_if_within` short-cuts sequences no longer than that many tokens (no scoring).
pub(crate) fn score_sequence(
    cache: &KvCache,
    seq: SeqId,
    layer: usize,
    q: &TensorView,
    skip_if_within: usize,
) -> Result<SeqPageScores> {
    let bounds = usable_bounds(cache, layer)?;
    let (qf, hq) = read_query(q, bounds.head_dim)?;
    let page_size = cache.config().page_size;
    let seq_len = cache.seq_len(seq)?;
    if seq_len > u32::MAX as usize {
        return Err(Error::out_of_range(
            "seq_len",
            seq_len as i64,
            format!("0..={} (token indices are u32)", u32::MAX),
        ));
    }
    if hq == 0 || hq % bounds.num_kv_heads != 0 {
        return Err(Error::invalid(
            "q",
            format!(
                "a number of query heads that is a positive multiple of num_kv_heads ({}), got {hq}",
                bounds.num_kv_heads
            ),
        ));
    }
    if seq_len <= skip_if_within {
        return Ok(SeqPageScores { scores: Vec::new(), num_pages: 0, page_size, seq_len });
    }
    let pages = cache.seq_pages(seq)?;
    let scores = page_scores(bounds, &pages, &qf, hq)?;
    Ok(SeqPageScores { scores, num_pages: pages.len(), page_size, seq_len })
}

/// Page-bound selection for the decode query `q` of sequence `seq` at `layer`: per KV
/// head, every token of the pages [`pages_to_keep`] keeps under `cfg`. A sequence no
/// longer than `cfg.budget_tokens` gives every token (see the module docs).
///
/// `q` is `[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`, any dtype, with
/// `num_qo_heads` a multiple of the cache's `num_kv_heads`.
///
/// Errors: an invalid `cfg`; an unknown sequence or layer; a cache without key bounds
/// (`track_key_bounds`); keys stored before RoPE (`key_rope`); a badly shaped `q`.
pub fn page_bounds(
    cache: &KvCache,
    seq: SeqId,
    layer: usize,
    q: &TensorView,
    cfg: &PageBoundsConfig,
) -> Result<Selection> {
    cfg.validate()?;
    let s = score_sequence(cache, seq, layer, q, cfg.budget_tokens)?;
    let hk = cache.config().num_kv_heads;
    if s.seq_len <= cfg.budget_tokens {
        return Selection::dense(hk, s.seq_len);
    }
    let heads: Vec<Vec<u32>> = (0..hk).map(|h| s.keep_tokens(h, cfg)).collect();
    let total: usize = heads.iter().map(Vec::len).sum();
    if total > u32::MAX as usize {
        return Err(Error::invalid("budget_tokens", "a budget whose selection over all heads fits u32 offsets"));
    }
    Selection::from_heads_unchecked(s.seq_len, &heads)
}
