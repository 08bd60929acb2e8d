//! Dense decode: one query token per sequence over the paged cache (flash-decoding:
//! long sequences are split into chunks processed in parallel and merged by LSE).

use rayon::prelude::*;

use crate::attention::kernel::{attend_block, merge_into, Block, Tokens, scaled_queries, write_partials, Ctx, Partial, RowState, Scratch, BLOCK};
use crate::attention::AttentionParams;
use crate::error::{Error, Result};
use crate::kv::PagedKv;
use crate::tensor::{TensorView, TensorViewMut};

/// Pick a chunk length so that there are a few tasks per thread.
pub(crate) fn chunk_len(params: &AttentionParams, total_tokens: usize) -> Result<usize> {
    match params.chunk_size {
        Some(0) => Err(Error::invalid("chunk_size", "at least 1 (or None for automatic)")),
        Some(c) => Ok(c),
        None => {
            let tasks = 4 * rayon::current_num_threads().max(1);
            let c = total_tokens.div_ceil(tasks).clamp(256, 8192);
            Ok(c.div_ceil(BLOCK) * BLOCK)
        }
    }
}

/// Decode attention for a batch: `q` is `[batch, num_qo_heads, head_dim]` (one token per
/// sequence of `kv`'s table, any dtype and strides); `out` has the same shape (any dtype);
/// `lse`, if given, receives `[batch, num_qo_heads]` natural-log LSEs. Every token of each
/// sequence is attended.
pub fn decode(kv: &PagedKv, q: &TensorView, out: &mut TensorViewMut, lse: Option<&mut [f32]>, params: &AttentionParams) -> Result<()> {
    let ctx = Ctx::new(kv, q, out, lse.as_deref(), params, "batch")?;
    let batch = q.shape()[0];
    if batch != kv.batch_size() {
        return Err(Error::shape("q", format!("[{}, ...] (batch of the page table)", kv.batch_size()), format!("{:?}", q.shape())));
    }
    let total: usize = (0..batch).map(|b| kv.seq_len(b)).sum();
    let chunk = chunk_len(params, total)?;
    let qs = scaled_queries(q, ctx.scale);
    let (hq, d, g) = (ctx.num_qo_heads, ctx.d, ctx.group);

    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| {
            let n = kv.seq_len(b);
            (0..n.div_ceil(chunk)).map(move |c| (b, c * chunk, ((c + 1) * chunk).min(n)))
        })
        .collect();
    let parts: Vec<(usize, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map_init(
            || Scratch::new(g, d),
            |sc, &(b, start, end)| {
                let mut o = vec![0f32; hq * d];
                let mut l = vec![f32::NEG_INFINITY; hq];
                let hk = kv.num_kv_heads();
                let mut states: Vec<RowState> = (0..hk).map(|_| RowState::new(g, d)).collect();
                // Blocks outermost, heads inside: the sequence's memory is read once, in order.
                let toks = Tokens::Range(start, end);
                let n = toks.len();
                let (mut cur, mut next) = (Block::default(), Block::default());
                cur.fill(kv, b, &toks, 0, n.min(BLOCK));
                for i0 in (0..n).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(n);
                    next.fill(kv, b, &toks, i1, (i1 + BLOCK).min(n));
                    next.prefetch(kv, 0..hk);
                    for (kh, st) in states.iter_mut().enumerate() {
                        let qrows = &qs[(b * hq + kh * g) * d..(b * hq + (kh + 1) * g) * d];
                        attend_block(&ctx, b, kh, qrows, g, &cur, &|_| usize::MAX, usize::MAX, st, sc);
                    }
                    std::mem::swap(&mut cur, &mut next);
                }
                for (kh, st) in states.iter().enumerate() {
                    for r in 0..g {
                        let h = kh * g + r;
                        l[h] = st.finish_row(r, d, &mut o[h * d..(h + 1) * d]);
                    }
                }
                (b, o, l)
            },
        )
        .collect();

    // Merge chunk states per sequence, in token order.
    let mut merged: Vec<Partial> = Vec::with_capacity(batch * hq);
    for b in 0..batch {
        for h in 0..hq {
            merged.push(Partial { token: b, head: h, out: vec![0f32; d], lse: f32::NEG_INFINITY });
        }
    }
    for (b, o, l) in &parts {
        for h in 0..hq {
            let m = &mut merged[b * hq + h];
            merge_into(&mut m.out, &mut m.lse, &o[h * d..(h + 1) * d], l[h]);
        }
    }
    write_partials(&merged, hq, out, lse);
    Ok(())
}
