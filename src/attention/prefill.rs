//! Prefill: a chunk of new tokens' queries against the cache, causal.

use rayon::prelude::*;

use crate::alloc::vec_with_capacity;
use crate::attention::decode::check_selections;
use crate::attention::kernel::{scaled_queries, Ctx, Rows, Scratch, Tokens};
use crate::attention::{AttentionParams, HeadTokens};
use crate::error::{Error, Result};
use crate::kv::PagedKv;
use crate::tensor::{TensorView, TensorViewMut};

/// Query tokens per task.
const TILE: usize = 16;

/// Check a ragged query index against the view; returns per-sequence query counts.
pub(crate) fn check_qo_indptr(kv: &PagedKv, qo_indptr: &[i32], total: usize) -> Result<()> {
    let batch = kv.batch_size();
    if qo_indptr.len() != batch + 1 {
        return Err(Error::shape(
            "qo_indptr",
            format!("[{}] (batch + 1)", batch + 1),
            format!("[{}]", qo_indptr.len()),
        ));
    }
    if qo_indptr[0] != 0 || qo_indptr[batch] as usize != total {
        return Err(Error::invalid(
            "qo_indptr",
            format!("qo_indptr[0] == 0 and qo_indptr[batch] == {total} (query rows)"),
        ));
    }
    for b in 0..batch {
        let n = qo_indptr[b + 1] - qo_indptr[b];
        if n < 0 {
            return Err(Error::invalid(
                "qo_indptr",
                format!("non-decreasing values, qo_indptr[{}] < qo_indptr[{b}]", b + 1),
            ));
        }
        if n as usize > kv.seq_len(b) {
            return Err(Error::invalid(
                "qo_indptr",
                format!(
                    "at most seq_len = {} queries for sequence {b} (queries are its last tokens), got {n}",
                    kv.seq_len(b)
                ),
            ));
        }
    }
    Ok(())
}

/// Row-relative sinks + sliding-window mask of one KV head in prefill (the Λ-mask of
/// LM-Infinite; StreamingLLM's window): query token `i` sees token `t` only if
/// `t < sinks` or `i - t < window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingWindow {
    pub sinks: usize,
    pub window: usize,
}

/// Prefill attention. `q` is `[total, num_qo_heads, head_dim]`; rows
/// `qo_indptr[b]..qo_indptr[b+1]` are the queries of sequence `b` of `kv`'s table, and are its
/// last tokens (append and write them to the cache first). With `causal`, query `i` of `n`
/// sees tokens `0..=seq_len - n + i`; without, every token. `out` has q's shape; `lse`, if
/// given, is `[total, num_qo_heads]`. With pre-RoPE keys, `q` is taken before RoPE as well.
pub fn prefill(
    kv: &PagedKv,
    q: &TensorView,
    qo_indptr: &[i32],
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
    causal: bool,
) -> Result<()> {
    let ctx = Ctx::new(kv, q, out, lse.as_deref(), params, "total")?;
    check_qo_indptr(kv, qo_indptr, q.shape()[0])?;
    run(&ctx, q, qo_indptr, out, lse, causal, &|b, _| Tokens::Range(0, kv.seq_len(b)), &[])
}

/// Sparse prefill (causal): KV head `h` of sequence `b` reads only `selections[b].head(h)`,
/// further restricted per query row by `windows[h]` when given (`windows` is empty or has
/// one entry per KV head). The result equals causal attention over exactly those tokens.
#[allow(clippy::too_many_arguments)]
pub fn prefill_sparse<S: HeadTokens>(
    kv: &PagedKv,
    q: &TensorView,
    qo_indptr: &[i32],
    selections: &[S],
    windows: &[Option<StreamingWindow>],
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
) -> Result<()> {
    let ctx = Ctx::new(kv, q, out, lse.as_deref(), params, "total")?;
    check_qo_indptr(kv, qo_indptr, q.shape()[0])?;
    check_selections(kv, selections)?;
    if !windows.is_empty() && windows.len() != kv.num_kv_heads() {
        return Err(Error::shape(
            "windows",
            format!("0 or {} entries (one per KV head)", kv.num_kv_heads()),
            format!("{}", windows.len()),
        ));
    }
    if let Some(h) = windows.iter().position(|w| matches!(w, Some(w) if w.window == 0)) {
        return Err(Error::invalid(format!("windows[{h}].window"), "at least 1"));
    }
    run(&ctx, q, qo_indptr, out, lse, true, &|b, h| Tokens::List(selections[b].head(h)), windows)
}

#[allow(clippy::too_many_arguments)]
fn run<'l>(
    ctx: &Ctx,
    q: &TensorView,
    qo_indptr: &[i32],
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    causal: bool,
    lists: &(dyn Fn(usize, usize) -> Tokens<'l> + Sync),
    windows: &[Option<StreamingWindow>],
) -> Result<()> {
    let kv = ctx.kv;
    let qs = scaled_queries(q, ctx.scale)?;
    let (hq, d, g, hk) = (ctx.num_qo_heads, ctx.d, ctx.group, kv.num_kv_heads());

    let ntasks: usize =
        (0..kv.batch_size()).map(|b| hk * (qo_indptr[b + 1] as usize - qo_indptr[b] as usize).div_ceil(TILE)).sum();
    let mut tasks = vec_with_capacity(ntasks, "prefill tasks")?;
    for b in 0..kv.batch_size() {
        let (s, e) = (qo_indptr[b] as usize, qo_indptr[b + 1] as usize);
        for kh in 0..hk {
            for t0 in (s..e).step_by(TILE) {
                tasks.push((b, kh, t0, (t0 + TILE).min(e), s, e));
            }
        }
    }
    // Longest tasks (latest queries see the most keys) first, for better balance.
    tasks.sort_by_key(|&(b, _, t0, _, s, e)| std::cmp::Reverse(kv.seq_len(b) - (e - s) + (t0 - s)));
    // Every query row's result, task after task (`q.shape()[0] * hq` rows in all), split
    // into one piece per task before the parallel work.
    let mut res = Rows::new(q.shape()[0] * hq, d, "prefill results")?;
    let mut pieces = vec_with_capacity(tasks.len(), "prefill tasks")?;
    let (mut rest_o, mut rest_l) = (&mut res.out[..], &mut res.lse[..]);
    for task in &tasks {
        let rows = (task.3 - task.2) * g;
        let (o, o_rest) = std::mem::take(&mut rest_o).split_at_mut(rows * d);
        let (l, l_rest) = std::mem::take(&mut rest_l).split_at_mut(rows);
        pieces.push((task, o, l));
        (rest_o, rest_l) = (o_rest, l_rest);
    }
    pieces.into_par_iter().for_each_init(
        || Scratch::new(TILE * g, d),
        |sc, (&(b, kh, t0, t1, s, e), o, l)| {
            let nt = t1 - t0;
            let rows = nt * g;
            let mut qrows = vec![0f32; rows * d];
            for i in 0..nt {
                for r in 0..g {
                    let src = ((t0 + i) * hq + kh * g + r) * d;
                    qrows[(i * g + r) * d..(i * g + r + 1) * d].copy_from_slice(&qs[src..src + d]);
                }
            }
            let len = kv.seq_len(b);
            let first = len - (e - s) + (t0 - s);
            let q_token = |r: usize| first + r / g;
            let limit = |r: usize| if causal { first + r / g } else { usize::MAX };
            let window = windows.get(kh).copied().flatten();
            let in_window =
                |r: usize, t: usize| window.is_some_and(|w| t < w.sinks || q_token(r).saturating_sub(t) < w.window);
            let filter: Option<&(dyn Fn(usize, usize) -> bool + Sync)> =
                if window.is_some() { Some(&in_window) } else { None };
            let all = lists(b, kh);
            let st = ctx.attend_rows(b, kh, &qrows, rows, &q_token, all, 0, all, &limit, filter, sc);
            for (r, l) in l.iter_mut().enumerate() {
                *l = st.finish_row(r, d, &mut o[r * d..(r + 1) * d]);
            }
        },
    );
    let mut lse = lse;
    let mut row = 0;
    for &(_, kh, t0, t1, _, _) in &tasks {
        for t in t0..t1 {
            for h in kh * g..(kh + 1) * g {
                out.write_row(&[t, h], &res.out[row * d..(row + 1) * d]);
                if let Some(l) = lse.as_deref_mut() {
                    l[t * hq + h] = res.lse[row];
                }
                row += 1;
            }
        }
    }
    Ok(())
}
