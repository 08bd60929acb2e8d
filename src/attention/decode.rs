//! Dense decode: one query token per sequence over the paged cache (flash-decoding:
//! long sequences are split into chunks processed in parallel and merged by LSE).

use rayon::prelude::*;

use crate::alloc::{mul, vec_with_capacity};
use crate::attention::kernel::{
    attend_block, merge_into, scaled_queries, Block, Ctx, KeyPos, Pass, RowState, Rows, Scratch, Tokens, BLOCK,
};
use crate::attention::{AttentionParams, HeadTokens, PositionMode};
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

fn check_batch(kv: &PagedKv, q: &TensorView) -> Result<usize> {
    let batch = q.shape()[0];
    if batch != kv.batch_size() {
        return Err(Error::shape(
            "q",
            format!("[{}, ...] (batch of the page table)", kv.batch_size()),
            format!("{:?}", q.shape()),
        ));
    }
    Ok(batch)
}

/// Check that per-sequence selections match the view: one per sequence, the view's KV
/// heads and length, every head's indices strictly ascending and in range.
pub(crate) fn check_selections<S: HeadTokens>(kv: &PagedKv, selections: &[S]) -> Result<()> {
    if selections.len() != kv.batch_size() {
        return Err(Error::shape(
            "selections",
            format!("{} selections (one per sequence)", kv.batch_size()),
            format!("{}", selections.len()),
        ));
    }
    for (b, s) in selections.iter().enumerate() {
        if s.num_kv_heads() != kv.num_kv_heads() {
            return Err(Error::shape(
                format!("selections[{b}]"),
                format!("{} KV heads", kv.num_kv_heads()),
                format!("{}", s.num_kv_heads()),
            ));
        }
        if s.seq_len() != kv.seq_len(b) {
            return Err(Error::invalid(
                format!("selections[{b}]"),
                format!("a selection over the sequence's {} tokens, built over {}", kv.seq_len(b), s.seq_len()),
            ));
        }
        for h in 0..s.num_kv_heads() {
            let l = s.head(h);
            if let Some(i) = (0..l.len()).find(|&i| l[i] as usize >= s.seq_len() || (i > 0 && l[i] <= l[i - 1])) {
                return Err(Error::invalid(
                    format!("selections[{b}].head({h})[{i}]"),
                    format!("strictly ascending token indices below {}, got {}", s.seq_len(), l[i]),
                ));
            }
        }
    }
    Ok(())
}

/// Decode attention for a batch: `q` is `[batch, num_qo_heads, head_dim]` (one token per
/// sequence of `kv`'s table, any dtype and strides); `out` has the same shape (any dtype);
/// `lse`, if given, receives `[batch, num_qo_heads]` natural-log LSEs. Every token of each
/// sequence is attended.
///
/// When the keys are stored before RoPE, `q` is taken before RoPE too and both are rotated
/// here, with positions numbered by `params.positions`; the query is the sequence's last token.
pub fn decode(
    kv: &PagedKv,
    q: &TensorView,
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
) -> Result<()> {
    let ctx = Ctx::new(kv, q, out, lse.as_deref(), params, "batch")?;
    check_batch(kv, q)?;
    decode_shared(&ctx, q, out, lse, params, &|b| Tokens::Range(0, kv.seq_len(b)))
}

/// Decode where all KV heads of sequence `b` read the same tokens `list(b)`: blocks
/// outermost and heads inside, so each block's rows of every head are read together
/// (token-major pages hold a token's heads side by side), split into chunks.
fn decode_shared<'l>(
    ctx: &Ctx,
    q: &TensorView,
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
    list: &(dyn Fn(usize) -> Tokens<'l> + Sync),
) -> Result<()> {
    let kv = ctx.kv;
    let batch = q.shape()[0];
    if ctx.rope.is_some() && matches!(ctx.positions, PositionMode::Capped { .. }) {
        // Capped positions read near and far keys in two passes per head.
        return decode_lists(ctx, q, out, lse, params, &|b, _| list(b));
    }
    let total: usize = (0..batch).map(|b| list(b).len()).sum();
    let chunk = chunk_len(params, total)?;
    let mut qs = scaled_queries(q, ctx.scale)?;
    let (hq, d, g) = (ctx.num_qo_heads, ctx.d, ctx.group);
    // Keys stored before RoPE: each query is rotated once to its position (the last token's
    // stored position, or under contiguous numbering the count of listed tokens before it),
    // each key as it is read.
    let contiguous = ctx.positions == PositionMode::Contiguous;
    if ctx.rope.is_some() {
        for (b, rows) in qs.chunks_exact_mut(hq * d).enumerate() {
            if let Some(last) = kv.seq_len(b).checked_sub(1) {
                ctx.rotate_rows(
                    rows,
                    if contiguous { list(b).count_below(last) as f32 } else { kv.position(b, last) as f32 },
                );
            }
        }
    }

    let ntasks: usize = (0..batch).map(|b| list(b).len().div_ceil(chunk)).sum();
    let mut tasks = vec_with_capacity(ntasks, "decode tasks")?;
    tasks.extend((0..batch).flat_map(|b| {
        let n = list(b).len();
        (0..n.div_ceil(chunk)).map(move |c| (b, c * chunk, ((c + 1) * chunk).min(n)))
    }));
    // Every task's rows for all query heads, then their merge per sequence: sized by the
    // caller's batch, heads and chunking, so allocated fallibly before any work.
    let mut parts = Rows::new(mul(ntasks, hq, "chunk_size")?, d, "decode partial results")?;
    let mut merged = Rows::new(batch * hq, d, "decode results")?;
    parts.out.par_chunks_mut(hq * d).zip(parts.lse.par_chunks_mut(hq)).zip(tasks.par_iter()).for_each_init(
        || Scratch::new(g, d),
        |sc, ((o, l), &(b, start, end))| {
            let hk = kv.num_kv_heads();
            let mut states: Vec<RowState> = (0..hk).map(|_| RowState::new(g, d)).collect();
            // Blocks outermost, heads inside: the sequence's memory is read once, in order.
            let toks = list(b).slice(start, end);
            let pass = Pass { key_pos: if contiguous { KeyPos::Index(start) } else { KeyPos::Stored }, ..Pass::ALL };
            let n = toks.len();
            let (mut cur, mut next) = (Block::default(), Block::default());
            cur.fill(kv, b, &toks, 0, n.min(BLOCK));
            for i0 in (0..n).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(n);
                next.fill(kv, b, &toks, i1, (i1 + BLOCK).min(n));
                for (kh, st) in states.iter_mut().enumerate() {
                    let qrows = &qs[(b * hq + kh * g) * d..(b * hq + (kh + 1) * g) * d];
                    // Rows read next: the next head's of this block, after the last head
                    // the first head's of the next block.
                    if kh + 1 < hk {
                        cur.head_rows(kv, kh + 1, &mut sc.ahead_k, &mut sc.ahead_v);
                    } else {
                        next.head_rows(kv, 0, &mut sc.ahead_k, &mut sc.ahead_v);
                    }
                    attend_block(ctx, b, kh, qrows, g, &mut cur, &pass, usize::MAX, st, sc);
                }
                std::mem::swap(&mut cur, &mut next);
            }
            for (kh, st) in states.iter().enumerate() {
                for r in 0..g {
                    let h = kh * g + r;
                    l[h] = st.finish_row(r, d, &mut o[h * d..(h + 1) * d]);
                }
            }
        },
    );

    // Merge chunk states per sequence, in token order.
    for (i, &(b, _, _)) in tasks.iter().enumerate() {
        for h in 0..hq {
            let (mo, ml) = merged.row(b * hq + h);
            merge_into(mo, ml, &parts.out[(i * hq + h) * d..(i * hq + h + 1) * d], parts.lse[i * hq + h]);
        }
    }
    merged.write(hq, out, lse);
    Ok(())
}

/// Sparse decode: like [`decode`], but KV head `h` of sequence `b` reads only the tokens
/// `selections[b].head(h)` (query heads of a GQA group share their KV head's tokens).
/// The result equals dense attention over exactly those tokens. With pre-RoPE keys and
/// `PositionMode::Contiguous`, the tokens a head reads are numbered 0.. in order.
pub fn decode_sparse<S: HeadTokens>(
    kv: &PagedKv,
    q: &TensorView,
    selections: &[S],
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
) -> Result<()> {
    let ctx = Ctx::new(kv, q, out, lse.as_deref(), params, "batch")?;
    check_batch(kv, q)?;
    check_selections(kv, selections)?;
    // Every head of every sequence reading the same tokens (sinks and windows, GemFilter,
    // one list for all heads): the blocks-outermost path of dense decode over those lists.
    let shared = selections.iter().all(|s| (1..s.num_kv_heads()).all(|h| s.head(h) == s.head(0)));
    if shared {
        return decode_shared(&ctx, q, out, lse, params, &|b| Tokens::List(selections[b].head(0)));
    }
    decode_lists(&ctx, q, out, lse, params, &|b, h| Tokens::List(selections[b].head(h)))
}

/// Decode where each (sequence, KV head) reads its own token list, split into chunks.
fn decode_lists<'l>(
    ctx: &Ctx,
    q: &TensorView,
    out: &mut TensorViewMut,
    lse: Option<&mut [f32]>,
    params: &AttentionParams,
    lists: &(dyn Fn(usize, usize) -> Tokens<'l> + Sync),
) -> Result<()> {
    let kv = ctx.kv;
    let batch = q.shape()[0];
    let (hq, d, g, hk) = (ctx.num_qo_heads, ctx.d, ctx.group, kv.num_kv_heads());
    let total: usize = (0..batch).map(|b| (0..hk).map(|h| lists(b, h).len()).sum::<usize>()).sum::<usize>() / hk;
    let chunk = chunk_len(params, total)?;
    let qs = scaled_queries(q, ctx.scale)?;
    let ntasks: usize = (0..batch).map(|b| (0..hk).map(|h| lists(b, h).len().div_ceil(chunk)).sum::<usize>()).sum();
    let mut tasks = vec_with_capacity(ntasks, "decode tasks")?;
    for b in 0..batch {
        for kh in 0..hk {
            let n = lists(b, kh).len();
            for c in 0..n.div_ceil(chunk) {
                tasks.push((b, kh, c * chunk, ((c + 1) * chunk).min(n)));
            }
        }
    }
    let mut parts = Rows::new(mul(ntasks, g, "chunk_size")?, d, "decode partial results")?;
    let mut merged = Rows::new(batch * hq, d, "decode results")?;
    parts.out.par_chunks_mut(g * d).zip(parts.lse.par_chunks_mut(g)).zip(tasks.par_iter()).for_each_init(
        || Scratch::new(g, d),
        |sc, ((o, l), &(b, kh, i0, i1))| {
            let all = lists(b, kh);
            let last = kv.seq_len(b) - 1;
            let qrows = &qs[(b * hq + kh * g) * d..(b * hq + (kh + 1) * g) * d];
            let st = ctx.attend_rows(b, kh, qrows, g, &|_| last, all, i0, all.slice(i0, i1), &|_| usize::MAX, None, sc);
            for r in 0..g {
                l[r] = st.finish_row(r, d, &mut o[r * d..(r + 1) * d]);
            }
        },
    );
    for (i, &(b, kh, _, _)) in tasks.iter().enumerate() {
        for r in 0..g {
            let (mo, ml) = merged.row(b * hq + kh * g + r);
            merge_into(mo, ml, &parts.out[(i * g + r) * d..(i * g + r + 1) * d], parts.lse[i * g + r]);
        }
    }
    merged.write(hq, out, lse);
    Ok(())
}
