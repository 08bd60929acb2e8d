//! A plain f64 implementation of attention, for tests only. Slow and obviously correct:
//! it reads keys and values one at a time through [`PagedKv::key`] / [`PagedKv::value`] and
//! applies RoPE and position modes literally.

use crate::attention::{AttentionParams, PositionMode};
use crate::error::Result;
use crate::kv::PagedKv;
use crate::tensor::TensorView;
use crate::KeyRope;

/// Output `[num_qo_heads * head_dim]` and LSE `[num_qo_heads]` of one query token.
#[derive(Debug, Clone)]
pub struct RefState {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

fn rotate(x: &mut [f64], pos: f64, params: &AttentionParams) {
    let r = params.rope.expect("rope checked by the caller");
    let d = x.len();
    let rd = r.rotary_dim_for(d);
    let p = pos / r.position_scale as f64;
    for i in 0..rd / 2 {
        let ang = p * (r.theta as f64).powf(-2.0 * i as f64 / rd as f64);
        let (a, b) = match r.style {
            crate::attention::RopeStyle::HalfSplit => (i, i + rd / 2),
            crate::attention::RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * ang.cos() - xb * ang.sin();
        x[b] = xa * ang.sin() + xb * ang.cos();
    }
}

/// Attention of query token `q_token` of sequence `b` (`q`: `[num_qo_heads * head_dim]`)
/// over the tokens `t` with `keep(kv_head, t)` (the head's selection) and
/// `visible(kv_head, t)` (a row mask such as causality or a window). With pre-RoPE keys the
/// query and keys are rotated as `params.positions` says; `Contiguous` numbers the selected
/// tokens 0.. in order, whatever the row mask hides.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    kv: &PagedKv,
    b: usize,
    q: &[f32],
    num_qo_heads: usize,
    params: &AttentionParams,
    q_token: usize,
    keep: &dyn Fn(usize, usize) -> bool,
    visible: &dyn Fn(usize, usize) -> bool,
) -> RefState {
    let d = kv.head_dim();
    let hk = kv.num_kv_heads();
    let group = num_qo_heads / hk;
    let scale = params.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
    let n = kv.seq_len(b);
    let pre = kv.key_rope() == KeyRope::PreRope;
    let mut out = vec![0f64; num_qo_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; num_qo_heads];
    if n == 0 {
        // An empty sequence: nothing to attend to (and no query token to position).
        return RefState { out, lse };
    }
    for h in 0..num_qo_heads {
        let kh = h / group;
        let kept: Vec<usize> = (0..n).filter(|&t| keep(kh, t)).collect();
        let pos = |t: usize| kv.position(b, t) as f64;
        let q_pos = match params.positions {
            PositionMode::Contiguous => kept.iter().filter(|&&t| t < q_token).count() as f64,
            _ => pos(q_token),
        };
        let mut qh: Vec<f64> = q[h * d..(h + 1) * d].iter().map(|&x| x as f64).collect();
        if pre {
            rotate(&mut qh, q_pos, params);
        }
        let mut scores = Vec::new();
        let mut vals = Vec::new();
        for (rank, &t) in kept.iter().enumerate() {
            if !visible(kh, t) {
                continue;
            }
            let mut k: Vec<f64> = kv.key(b, t, kh).iter().map(|&x| x as f64).collect();
            if pre {
                let k_pos = match params.positions {
                    PositionMode::Original => pos(t),
                    PositionMode::Contiguous => rank as f64,
                    PositionMode::Capped { max_distance } => q_pos - (q_pos - pos(t)).min(max_distance as f64),
                };
                rotate(&mut k, k_pos, params);
            }
            let mut s = scale * qh.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>();
            if let Some(c) = params.logit_soft_cap {
                s = c as f64 * (s / c as f64).tanh();
            }
            scores.push(s);
            vals.push(kv.value(b, t, kh));
        }
        if scores.is_empty() {
            continue;
        }
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        lse[h] = m + sum.ln();
        for (s, v) in scores.iter().zip(&vals) {
            let p = (s - m).exp() / sum;
            for c in 0..d {
                out[h * d + c] += p * v[c] as f64;
            }
        }
    }
    RefState { out, lse }
}

fn query_row(q: &TensorView, i: usize) -> Vec<f32> {
    let (hq, d) = (q.shape()[1], q.shape()[2]);
    let mut row = vec![0f32; hq * d];
    for h in 0..hq {
        q.read_row(&[i, h], &mut row[h * d..(h + 1) * d]);
    }
    row
}

/// Reference decode: one query token (the sequence's last) per sequence, `q` of shape
/// `[batch, num_qo_heads, head_dim]`; every token attended.
pub fn decode(kv: &PagedKv, q: &TensorView, params: &AttentionParams) -> Result<Vec<RefState>> {
    decode_selected(kv, q, params, &|_, _, _| true)
}

/// Reference decode where KV head `h` of sequence `b` reads token `t` iff `keep(b, h, t)`.
pub fn decode_selected(
    kv: &PagedKv,
    q: &TensorView,
    params: &AttentionParams,
    keep: &dyn Fn(usize, usize, usize) -> bool,
) -> Result<Vec<RefState>> {
    let hq = q.shape()[1];
    Ok((0..q.shape()[0])
        .map(|b| {
            attend_one(
                kv,
                b,
                &query_row(q, b),
                hq,
                params,
                kv.seq_len(b).saturating_sub(1),
                &|h, t| keep(b, h, t),
                &|_, _| true,
            )
        })
        .collect())
}

/// Reference prefill: `q` `[total, num_qo_heads, head_dim]`, sequence `b` owning query rows
/// `qo_indptr[b]..qo_indptr[b+1]`, which are the last tokens of that sequence. With `causal`,
/// query `i` of `n` sees tokens `0..=seq_len - n + i`.
pub fn prefill(
    kv: &PagedKv,
    q: &TensorView,
    qo_indptr: &[i32],
    params: &AttentionParams,
    causal: bool,
) -> Result<Vec<RefState>> {
    prefill_selected(kv, q, qo_indptr, params, &|_, _, _| true, &|_, _, qt, t| !causal || t <= qt)
}

/// Reference prefill where KV head `h` of sequence `b` has selected the tokens with
/// `keep(b, h, t)`, and query token `qt` reads those with `visible(b, h, qt, t)` (the caller
/// includes causality).
pub fn prefill_selected(
    kv: &PagedKv,
    q: &TensorView,
    qo_indptr: &[i32],
    params: &AttentionParams,
    keep: &dyn Fn(usize, usize, usize) -> bool,
    visible: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Result<Vec<RefState>> {
    let hq = q.shape()[1];
    let mut res = Vec::new();
    for b in 0..qo_indptr.len() - 1 {
        let (s, e) = (qo_indptr[b] as usize, qo_indptr[b + 1] as usize);
        let len = kv.seq_len(b);
        for i in 0..e - s {
            let qt = len - (e - s) + i;
            res.push(attend_one(kv, b, &query_row(q, s + i), hq, params, qt, &|h, t| keep(b, h, t), &|h, t| {
                visible(b, h, qt, t)
            }));
        }
    }
    Ok(res)
}
