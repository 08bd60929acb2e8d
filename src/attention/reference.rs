//! A plain f64 implementation of attention, for tests only. Slow and obviously correct:
//! it reads keys and values one at a time through [`PagedKv::key`] / [`PagedKv::value`].

use crate::attention::AttentionParams;
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

/// Attention of one query token (`q`: `[num_qo_heads * head_dim]`) over the keys and values
/// of sequence `b` whose token index passes `keep`.
pub fn attend_one(kv: &PagedKv, b: usize, q: &[f32], num_qo_heads: usize, params: &AttentionParams, keep: &dyn Fn(usize) -> bool) -> RefState {
    let d = kv.head_dim();
    let hk = kv.num_kv_heads();
    let group = num_qo_heads / hk;
    let scale = params.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
    let n = kv.seq_len(b);
    let mut out = vec![0f64; num_qo_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; num_qo_heads];
    let inv = params.rope.map(|r| (r, r.inv_freq(d)));
    for h in 0..num_qo_heads {
        let kh = h / group;
        let qh = &q[h * d..(h + 1) * d];
        let mut scores = Vec::new();
        let mut vals = Vec::new();
        for t in (0..n).filter(|&t| keep(t)) {
            let mut k = kv.key(b, t, kh);
            if kv.key_rope() == KeyRope::PreRope {
                if let Some((r, inv)) = &inv {
                    r.rotate(&mut k, kv.position(b, t) as f32, inv);
                }
            }
            let mut s = scale * qh.iter().zip(&k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
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

/// Reference decode: one query token per sequence, `q` of shape `[batch, num_qo_heads, head_dim]`.
pub fn decode(kv: &PagedKv, q: &TensorView, params: &AttentionParams) -> Result<Vec<RefState>> {
    let (batch, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let mut res = Vec::with_capacity(batch);
    let mut row = vec![0f32; hq * d];
    for b in 0..batch {
        for h in 0..hq {
            q.read_row(&[b, h], &mut row[h * d..(h + 1) * d]);
        }
        res.push(attend_one(kv, b, &row, hq, params, &|_| true));
    }
    Ok(res)
}

/// Reference prefill: `q` `[total, num_qo_heads, head_dim]`, sequence `b` owning query rows
/// `qo_indptr[b]..qo_indptr[b+1]`, which are the last tokens of that sequence. With `causal`,
/// query `i` of `n` sees tokens `0..=seq_len - n + i`.
pub fn prefill(kv: &PagedKv, q: &TensorView, qo_indptr: &[i32], params: &AttentionParams, causal: bool) -> Result<Vec<RefState>> {
    let (hq, d) = (q.shape()[1], q.shape()[2]);
    let mut res = Vec::new();
    let mut row = vec![0f32; hq * d];
    for b in 0..qo_indptr.len() - 1 {
        let (s, e) = (qo_indptr[b] as usize, qo_indptr[b + 1] as usize);
        let n = e - s;
        let len = kv.seq_len(b);
        for i in 0..n {
            for h in 0..hq {
                q.read_row(&[s + i, h], &mut row[h * d..(h + 1) * d]);
            }
            let last = len - n + i;
            res.push(attend_one(kv, b, &row, hq, params, &|t| !causal || t <= last));
        }
    }
    Ok(res)
}
