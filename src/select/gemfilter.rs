//! Early-layer token filtering (GemFilter) and observation-window scoring (SnapKV).
//!
//! GemFilter is a one-shot prompt filter: an engine runs the first layers of the model on
//! the whole prompt, takes the last query at a filter layer, and asks which prompt tokens
//! matter; then it re-prefills only those (with fresh positions) and answers from them.
//! Here a token's score is the sum over query heads of `q_h · k_t` (unscaled logits, before
//! softmax), computed per KV head from the sum of its group's queries, so repeated keys are
//! never materialised; the scores are smoothed by a centred 1-D average pool, and the `k`
//! best tokens are returned in position order.
//!
//! SnapKV scores the prompt by the attention the last `w` queries (the observation window)
//! pay to it: softmax per query head, summed over the window, pooled, and kept per KV head.

use rayon::prelude::*;

use crate::alloc::{collect_n, filled_vec, mul, reserve, zeroed_vec};
use crate::cpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::{PageTable, PagedKv};
use crate::select::keys::read_query;
/// Re-exported: the filter reads its keys through it.
pub use crate::select::keys::KeySource;
use crate::select::selection::Selection;
use crate::select::topk::try_top_k;
use crate::tensor::TensorView;

/// Options of [`select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemFilterConfig {
    /// Tokens to keep in all (including the forced first and last ones).
    pub k: usize,
    /// Width of the centred average pool; odd; 1 turns pooling off. Default 5.
    pub pool_kernel: usize,
    /// Always keep the first `keep_first` tokens (attention sinks).
    pub keep_first: usize,
    /// Always keep the last `keep_last` tokens (the question).
    pub keep_last: usize,
}

impl GemFilterConfig {
    pub fn new(k: usize) -> Self {
        GemFilterConfig { k, pool_kernel: 5, keep_first: 0, keep_last: 0 }
    }
}

/// Keys as row pointers: every access goes through here so a cache and a tensor look alike.
struct Keys<'a> {
    n: usize,
    hk: usize,
    d: usize,
    dtype: DType,
    row: Box<dyn Fn(usize, usize) -> *const u8 + Sync + 'a>,
    /// Rows whose channels are not contiguous are copied out first.
    contiguous: bool,
    tensor: Option<&'a TensorView<'a>>,
}

fn keys<'a>(src: &KeySource<'a>, view: Option<PagedKv<'a>>) -> Result<Keys<'a>> {
    match *src {
        KeySource::Cache { .. } => {
            let kv = view.expect("built by cache_view");
            if kv.key_rope() == crate::KeyRope::PreRope {
                return Err(Error::invalid(
                    "keys",
                    "keys stored after RoPE (the filter scores the model's real logits)",
                ));
            }
            Ok(Keys {
                n: kv.seq_len(0),
                hk: kv.num_kv_heads(),
                d: kv.head_dim(),
                dtype: kv.dtype(),
                row: Box::new(move |t, h| {
                    let (page, slot) = kv.locate(0, t);
                    kv.k_ptr(page, slot, h)
                }),
                contiguous: true,
                tensor: None,
            })
        }
        KeySource::Tensor(t) => {
            if t.shape().len() != 3 {
                return Err(Error::shape("keys", "[n, num_kv_heads, head_dim]", format!("{:?}", t.shape())));
            }
            let (n, hk, d) = (t.shape()[0], t.shape()[1], t.shape()[2]);
            if hk == 0 {
                return Err(Error::shape("keys", "[n, num_kv_heads >= 1, head_dim]", format!("{:?}", t.shape())));
            }
            // The kernels read 8 channels at a time.
            crate::config::validate_head_dim(d)?;
            let st = [t.strides()[0], t.strides()[1]];
            let es = t.dtype().size();
            let bytes = t.bytes();
            Ok(Keys {
                n,
                hk,
                d,
                dtype: t.dtype(),
                row: Box::new(move |tok, h| bytes[(tok * st[0] + h * st[1]) * es..].as_ptr()),
                contiguous: t.strides()[2] == 1,
                tensor: Some(t),
            })
        }
    }
}

/// Build the cache view a [`KeySource::Cache`] needs.
fn cache_view<'a>(src: &KeySource<'a>, table: &'a mut Option<PageTable>) -> Result<Option<PagedKv<'a>>> {
    if let KeySource::Cache { cache, seq, layer } = *src {
        *table = Some(cache.page_table(&[seq])?);
        return Ok(Some(cache.layer_view(layer, table.as_ref().unwrap())?));
    }
    Ok(None)
}

/// Unpooled GemFilter scores: for every token, the sum over query heads of `q_h · k_t`.
pub fn token_scores(q: &TensorView, src: KeySource) -> Result<Vec<f32>> {
    let mut table = None;
    let k = keys(&src, cache_view(&src, &mut table)?)?;
    let (qr, hq) = read_query(q, k.d)?;
    if hq == 0 || hq % k.hk != 0 {
        return Err(Error::shape(
            "q",
            format!("a number of query heads that is a positive multiple of num_kv_heads {}", k.hk),
            format!("{hq}"),
        ));
    }
    let (d, hk, g) = (k.d, k.hk, hq / k.hk);
    // Sum each group's queries: sum_h q_h·k = (sum_h q_h)·k for the shared key.
    let mut qsum = vec![0f32; hk * d];
    for h in 0..hq {
        for c in 0..d {
            qsum[(h / g) * d + c] += qr[h * d + c];
        }
    }
    const CHUNK: usize = 1024;
    let mut scores = zeroed_vec(k.n, "scores")?;
    scores.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, out)| {
        let t0 = ci * CHUNK;
        let mut ptrs = Vec::with_capacity(64);
        let mut part = vec![0f32; 64];
        let mut rowbuf = vec![0f32; 64 * d];
        for b0 in (0..out.len()).step_by(64) {
            let b1 = (b0 + 64).min(out.len());
            for h in 0..hk {
                ptrs.clear();
                let mut dtype = k.dtype;
                if k.contiguous {
                    ptrs.extend((b0..b1).map(|i| (k.row)(t0 + i, h)));
                } else {
                    let t = k.tensor.expect("non-contiguous rows come from a tensor");
                    for (j, i) in (b0..b1).enumerate() {
                        t.read_row(&[t0 + i, h], &mut rowbuf[j * d..(j + 1) * d]);
                        ptrs.push(rowbuf[j * d..].as_ptr() as *const u8);
                    }
                    dtype = DType::F32;
                }
                // SAFETY: every pointer addresses a full key row of `d` elements of `dtype`.
                unsafe { cpu::scores(&qsum[h * d..(h + 1) * d], 1, d, &ptrs, dtype, &mut part[..b1 - b0]) };
                for (o, &s) in out[b0..b1].iter_mut().zip(&part) {
                    *o += s;
                }
            }
        }
    });
    Ok(scores)
}

/// Centred 1-D average pool: entry `i` becomes the mean of entries `i - r ..= i + r`
/// (`r = kernel / 2`) that exist (edges average fewer entries). `kernel` must be odd.
pub fn avg_pool(scores: &[f32], kernel: usize) -> Result<Vec<f32>> {
    if kernel == 0 || kernel.is_multiple_of(2) {
        return Err(Error::invalid("pool_kernel", format!("an odd width (1 = no pooling), got {kernel}")));
    }
    let r = kernel / 2;
    let n = scores.len();
    let mut prefix = zeroed_vec::<f64>(n + 1, "pooled scores")?;
    for i in 0..n {
        prefix[i + 1] = prefix[i] + scores[i] as f64;
    }
    let pooled = (0..n).map(|i| {
        let (a, b) = (i.saturating_sub(r), (i + r + 1).min(n));
        ((prefix[b] - prefix[a]) / (b - a) as f64) as f32
    });
    collect_n(n, pooled, "pooled scores")
}

/// GemFilter: the `cfg.k` prompt tokens the filter layer's last query `q` points at,
/// ascending by position. `q` is `[num_qo_heads, head_dim]` (or with a leading 1), after
/// RoPE; keys come from `src`.
pub fn select(q: &TensorView, src: KeySource, cfg: &GemFilterConfig) -> Result<Vec<u32>> {
    let scores = token_scores(q, src)?;
    let n = scores.len();
    if n == 0 || n > u32::MAX as usize {
        return Err(Error::invalid("keys", format!("a non-empty context of at most {} tokens, got {n}", u32::MAX)));
    }
    if cfg.k == 0 || cfg.k > n {
        return Err(Error::out_of_range("k", cfg.k as i64, format!("1..={n} (the context length)")));
    }
    if cfg.keep_first + cfg.keep_last > cfg.k {
        return Err(Error::invalid(
            "k",
            format!("at least keep_first + keep_last = {}", cfg.keep_first + cfg.keep_last),
        ));
    }
    let mut pooled = avg_pool(&scores, cfg.pool_kernel)?;
    // Forced tokens rank first (score +inf); the rest by pooled score, ties by position.
    for (t, s) in pooled.iter_mut().enumerate() {
        if t < cfg.keep_first || t + cfg.keep_last >= n {
            *s = f32::INFINITY;
        }
    }
    try_top_k(&pooled, cfg.k)
}

/// How well one layer ranks a known needle: the share of the needle's tokens inside the
/// layer's GemFilter top-k.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerRecall {
    pub layer: usize,
    pub recall: f64,
}

/// Filter-layer calibration: for each layer, GemFilter's selection of `cfg.k` tokens from
/// that layer's last query and keys (given by `layer_inputs(layer)` as `(q, keys)`), and the
/// fraction of `needle` (a token range inside the prompt) it keeps. The best layer is the
/// earliest one with high recall.
pub fn calibrate_layers<'a>(
    num_layers: usize,
    needle: std::ops::Range<usize>,
    cfg: &GemFilterConfig,
    layer_inputs: &mut dyn FnMut(usize) -> Result<(TensorView<'a>, KeySource<'a>)>,
) -> Result<Vec<LayerRecall>> {
    if needle.is_empty() {
        return Err(Error::invalid("needle", "a non-empty token range"));
    }
    (0..num_layers)
        .map(|layer| {
            let (q, src) = layer_inputs(layer)?;
            let kept = select(&q, src, cfg)?;
            let hit = kept.iter().filter(|&&t| needle.contains(&(t as usize))).count();
            Ok(LayerRecall { layer, recall: hit as f64 / needle.len() as f64 })
        })
        .collect()
}

/// Options of [`snapkv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapKvConfig {
    /// Tokens kept per KV head, including the observation window.
    pub k: usize,
    /// Width of the centred average pool over the votes (odd; SnapKV uses 7).
    pub pool_kernel: usize,
    /// Multiplier of q·k before softmax; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
}

/// SnapKV's result: per KV head, the kept tokens (a [`Selection`] for compaction), and the
/// union over heads (for re-prefilling once).
#[derive(Debug, Clone)]
pub struct SnapKvSelection {
    pub per_head: Selection,
    pub union: Vec<u32>,
}

/// Observation-window scoring (SnapKV). `q_window` is `[w, num_qo_heads, head_dim]`: the
/// queries (after RoPE) of the prompt's last `w` tokens. Each window query attends causally
/// to the keys (softmax per query head, with `cfg.scale`); the probabilities it gives the
/// prefix (the tokens before the window) are summed over the window and over the query heads
/// of each KV head, pooled, and the best `k - w` prefix tokens per KV head are kept, plus
/// the window itself.
pub fn snapkv(q_window: &TensorView, src: KeySource, cfg: &SnapKvConfig) -> Result<SnapKvSelection> {
    if cfg.pool_kernel == 0 || cfg.pool_kernel.is_multiple_of(2) {
        return Err(Error::invalid("pool_kernel", format!("an odd width (1 = no pooling), got {}", cfg.pool_kernel)));
    }
    let mut table = None;
    let k = keys(&src, cache_view(&src, &mut table)?)?;
    let (n, hk, d) = (k.n, k.hk, k.d);
    let sh = q_window.shape();
    if sh.len() != 3 || sh[2] != d || sh[1] == 0 || !sh[1].is_multiple_of(hk) {
        return Err(Error::shape(
            "q_window",
            format!("[w, num_qo_heads (a multiple of {hk}), {d}]"),
            format!("{sh:?}"),
        ));
    }
    let (w, hq) = (sh[0], sh[1]);
    let g = hq / hk;
    if w == 0 || w > n {
        return Err(Error::out_of_range("q_window", w as i64, format!("1..={n} window queries (the context length)")));
    }
    if cfg.k < w || cfg.k > n {
        return Err(Error::out_of_range(
            "k",
            cfg.k as i64,
            format!("{w}..={n} (at least the window, at most the context)"),
        ));
    }
    if n > u32::MAX as usize {
        return Err(Error::invalid("keys", format!("a context of at most {} tokens, got {n}", u32::MAX)));
    }
    let scale = cfg.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let prefix = n - w;
    // Each head's logits are window queries x context: check that size before any work.
    let rows = mul(g, w, "q_window")?;
    let logits_len = mul(rows, n, "q_window")?;
    let heads = (0..hk)
        .into_par_iter()
        .map(|h| {
            // Row (i, j): window query i, query head h*g + j.
            let mut qr = zeroed_vec::<f32>(rows * d, "q_window rows")?;
            for i in 0..w {
                for j in 0..g {
                    q_window.read_row(&[i, h * g + j], &mut qr[(i * g + j) * d..(i * g + j + 1) * d]);
                }
            }
            qr.iter_mut().for_each(|x| *x *= scale);
            let mut logits = filled_vec(logits_len, f32::NEG_INFINITY, "SnapKV logits")?;
            let mut ptrs = Vec::with_capacity(64);
            let mut part = vec![0f32; rows * 64];
            let mut rowbuf = vec![0f32; 64 * d];
            for b0 in (0..n).step_by(64) {
                let b1 = (b0 + 64).min(n);
                ptrs.clear();
                let mut dtype = k.dtype;
                if k.contiguous {
                    ptrs.extend((b0..b1).map(|t| (k.row)(t, h)));
                } else {
                    let tv = k.tensor.expect("non-contiguous rows come from a tensor");
                    for (j, t) in (b0..b1).enumerate() {
                        tv.read_row(&[t, h], &mut rowbuf[j * d..(j + 1) * d]);
                        ptrs.push(rowbuf[j * d..].as_ptr() as *const u8);
                    }
                    dtype = DType::F32;
                }
                let bt = b1 - b0;
                // SAFETY: every pointer addresses a full key row of `d` elements of `dtype`.
                unsafe { cpu::scores(&qr, rows, d, &ptrs, dtype, &mut part[..rows * bt]) };
                for r in 0..rows {
                    let qtok = prefix + r / g;
                    for j in 0..bt {
                        if b0 + j <= qtok {
                            logits[r * n + b0 + j] = part[r * bt + j];
                        }
                    }
                }
            }
            let mut votes = zeroed_vec::<f32>(prefix, "SnapKV votes")?;
            for r in 0..rows {
                let row = &mut logits[r * n..(r + 1) * n];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum = cpu::exp_sub_sum(row, m);
                for (v, &p) in votes.iter_mut().zip(&row[..prefix]) {
                    *v += p / sum;
                }
            }
            let pooled = avg_pool(&votes, cfg.pool_kernel)?;
            let mut kept = try_top_k(&pooled, cfg.k - w)?;
            reserve(&mut kept, w, "selection indices")?;
            kept.extend(prefix as u32..n as u32);
            Ok(kept)
        })
        .collect::<Result<Vec<_>>>()?;
    let total = heads.iter().map(Vec::len).sum();
    let mut union = collect_n(total, heads.iter().flatten().copied(), "union")?;
    union.sort_unstable();
    union.dedup();
    Ok(SnapKvSelection { per_head: Selection::from_heads(n, heads)?, union })
}
