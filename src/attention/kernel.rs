//! The CPU attention engine shared by decode and prefill: online softmax over blocks of
//! tokens of one sequence and one KV head, for a set of query rows (the GQA group's heads,
//! times the query tokens of a prefill tile).

use crate::attention::simd;
use crate::attention::{AttentionParams, RopeConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::PagedKv;
use rayon::prelude::*;

use crate::tensor::{TensorView, TensorViewMut};
use crate::KeyRope;

/// Tokens scored per block.
pub(crate) const BLOCK: usize = 32;

/// Bytes between software prefetches (the hardware fetches the adjacent line of each pair).
const PREFETCH_STRIDE: usize = 128;

/// Validated, per-call constants.
pub(crate) struct Ctx<'a> {
    pub kv: &'a PagedKv<'a>,
    pub num_qo_heads: usize,
    pub group: usize,
    pub d: usize,
    pub scale: f32,
    pub soft_cap: Option<f32>,
    /// RoPE applied to keys at read time (keys stored before RoPE).
    pub rope: Option<(RopeConfig, Vec<f32>)>,
}

impl<'a> Ctx<'a> {
    /// Check q, out and lse against the view; `tokens` is the number of query rows.
    pub fn new(kv: &'a PagedKv<'a>, q: &TensorView, out: &TensorViewMut, lse: Option<&[f32]>, params: &AttentionParams, tokens_param: &str) -> Result<Self> {
        let d = kv.head_dim();
        let hk = kv.num_kv_heads();
        if q.shape().len() != 3 || q.shape()[2] != d {
            return Err(Error::shape("q", format!("[{tokens_param}, num_qo_heads, {d}]"), format!("{:?}", q.shape())));
        }
        let (n, hq) = (q.shape()[0], q.shape()[1]);
        if hq == 0 || hq % hk != 0 {
            return Err(Error::shape("q", format!("num_qo_heads a positive multiple of num_kv_heads {hk}"), format!("{hq} query heads")));
        }
        out.expect_shape("out", &[Some(n), Some(hq), Some(d)])?;
        if let Some(l) = lse {
            if l.len() != n * hq {
                return Err(Error::shape("lse", format!("[{n}, {hq}] ({} values)", n * hq), format!("{} values", l.len())));
            }
        }
        let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::invalid("scale", format!("a finite value, got {scale}")));
        }
        if let Some(c) = params.logit_soft_cap {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid("logit_soft_cap", format!("a finite value > 0, got {c}")));
            }
        }
        let rope = match (kv.key_rope(), params.rope) {
            (KeyRope::PreRope, None) => {
                return Err(Error::invalid("rope", "a RopeConfig: the keys are stored before RoPE"));
            }
            (KeyRope::PreRope, Some(r)) => {
                r.validate(d)?;
                Some((r, r.inv_freq(d)))
            }
            (KeyRope::PostRope, _) => None,
        };
        Ok(Ctx { kv, num_qo_heads: hq, group: hq / hk, d, scale, soft_cap: params.logit_soft_cap, rope })
    }
}

/// Running softmax state of `rows` query rows.
pub(crate) struct RowState {
    pub o: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
}

impl RowState {
    pub fn new(rows: usize, d: usize) -> Self {
        RowState { o: vec![0.0; rows * d], m: vec![f32::NEG_INFINITY; rows], l: vec![0.0; rows] }
    }

    /// Normalised output of row `r` and its LSE (zeros and -inf for a row that saw no key).
    pub fn finish_row(&self, r: usize, d: usize, out: &mut [f32]) -> f32 {
        let l = self.l[r];
        if l == 0.0 {
            out.fill(0.0);
            return f32::NEG_INFINITY;
        }
        for (o, &x) in out.iter_mut().zip(&self.o[r * d..(r + 1) * d]) {
            *o = x / l;
        }
        self.m[r] + l.ln()
    }
}

/// Reusable buffers for one worker.
pub(crate) struct Scratch {
    s: Vec<f32>,
    k_ptrs: Vec<*const u8>,
    v_ptrs: Vec<*const u8>,
    k_rot: Vec<f32>,
}

impl Scratch {
    pub fn new(rows: usize, d: usize) -> Self {
        Scratch { s: vec![0.0; rows * BLOCK], k_ptrs: Vec::with_capacity(BLOCK), v_ptrs: Vec::with_capacity(BLOCK), k_rot: vec![0.0; BLOCK * d] }
    }
}

/// Ascending token indices of one sequence that attention reads.
#[derive(Clone, Copy)]
pub(crate) enum Tokens<'a> {
    Range(usize, usize),
    List(&'a [usize]),
}

impl Tokens<'_> {
    pub fn len(&self) -> usize {
        match *self {
            Tokens::Range(s, e) => e.saturating_sub(s),
            Tokens::List(l) => l.len(),
        }
    }
    #[inline(always)]
    fn get(&self, i: usize) -> usize {
        match *self {
            Tokens::Range(s, _) => s + i,
            Tokens::List(l) => l[i],
        }
    }
    /// Number of leading tokens not greater than `limit`.
    fn count_upto(&self, limit: usize) -> usize {
        match *self {
            Tokens::Range(s, e) => e.min(limit.saturating_add(1)).saturating_sub(s),
            Tokens::List(l) => l.partition_point(|&t| t <= limit),
        }
    }
}

/// A block of at most [`BLOCK`] tokens of one sequence and where each lives.
#[derive(Default)]
pub(crate) struct Block {
    pub tokens: Vec<usize>,
    /// K and V of head 0 of each token; head `h` is `h * head stride` further.
    k0: Vec<*const u8>,
    v0: Vec<*const u8>,
}

// SAFETY: the pointers are read-only addresses into a PagedKv shared by the workers.
unsafe impl Send for Block {}

impl Block {
    /// Load tokens `i0..i1` of `tokens`.
    pub fn fill(&mut self, kv: &PagedKv, b: usize, tokens: &Tokens, i0: usize, i1: usize) {
        self.tokens.clear();
        self.k0.clear();
        self.v0.clear();
        for i in i0..i1 {
            let t = tokens.get(i);
            let (page, slot) = kv.locate(b, t);
            self.tokens.push(t);
            self.k0.push(kv.k_ptr(page, slot, 0));
            self.v0.push(kv.v_ptr(page, slot, 0));
        }
    }

    /// Ask the memory system for the block's K and V rows of `heads` ahead of their use.
    pub fn prefetch(&self, kv: &PagedKv, heads: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            let es = kv.dtype().size();
            let row = kv.head_dim() * es;
            let (ks, vs) = (kv.layout().k_strides[2] * es, kv.layout().v_strides[2] * es);
            let fetch = |p: *const u8, stride: usize| {
                let span = |s: usize, e: usize| {
                    for off in (s..e).step_by(PREFETCH_STRIDE) {
                        // SAFETY: prefetch is only a hint and never faults; the address is in the view.
                        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off) as *const i8) };
                    }
                };
                if stride == row {
                    // Heads stored back to back: one span.
                    span(heads.start * row, heads.end * row);
                } else {
                    for h in heads.clone() {
                        span(h * stride, h * stride + row);
                    }
                }
            };
            for (&k, &v) in self.k0.iter().zip(&self.v0) {
                fetch(k, ks);
                fetch(v, vs);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (kv, heads);
    }
}

/// Attend `rows` query rows (`q`, already multiplied by the scale) to `tokens` of sequence
/// `b`, KV head `kh`, one block after another. Row `r` sees token `t` only if `t <= limit(r)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    ctx: &Ctx,
    b: usize,
    kh: usize,
    q: &[f32],
    rows: usize,
    tokens: Tokens,
    limit: &dyn Fn(usize) -> usize,
    st: &mut RowState,
    sc: &mut Scratch,
) {
    let kv = ctx.kv;
    let max_limit = (0..rows).map(limit).max().unwrap_or(0);
    let min_limit = (0..rows).map(limit).min().unwrap_or(0);
    let n = tokens.count_upto(max_limit);
    let (mut cur, mut next) = (Block::default(), Block::default());
    cur.fill(kv, b, &tokens, 0, n.min(BLOCK));
    cur.prefetch(kv, kh..kh + 1);
    for i0 in (0..n).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(n);
        next.fill(kv, b, &tokens, i1, (i1 + BLOCK).min(n));
        next.prefetch(kv, kh..kh + 1);
        attend_block(ctx, b, kh, q, rows, &cur, limit, min_limit, st, sc);
        std::mem::swap(&mut cur, &mut next);
    }
}

/// Attend `rows` query rows to one block of tokens of KV head `kh` (see [`attend`]);
/// `min_limit` is the smallest `limit(r)`, so blocks below it skip masking.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_block(
    ctx: &Ctx,
    b: usize,
    kh: usize,
    q: &[f32],
    rows: usize,
    blk: &Block,
    limit: &dyn Fn(usize) -> usize,
    min_limit: usize,
    st: &mut RowState,
    sc: &mut Scratch,
) {
    let d = ctx.d;
    let kv = ctx.kv;
    let t = blk.tokens.len();
    if t == 0 {
        return;
    }
    sc.k_ptrs.clear();
    sc.v_ptrs.clear();
    let es = kv.dtype().size();
    let (ko, vo) = (kh * kv.layout().k_strides[2] * es, kh * kv.layout().v_strides[2] * es);
    for (&k, &v) in blk.k0.iter().zip(&blk.v0) {
        sc.k_ptrs.push(k.wrapping_add(ko));
        sc.v_ptrs.push(v.wrapping_add(vo));
    }
    let mut k_dtype = kv.dtype();
    if let Some((rope, inv)) = &ctx.rope {
        for (j, &tok) in blk.tokens.iter().enumerate() {
            let row = &mut sc.k_rot[j * d..(j + 1) * d];
            // SAFETY: k_ptrs[j] points at d valid elements (PagedKv contract).
            let bytes = unsafe { std::slice::from_raw_parts(sc.k_ptrs[j], d * k_dtype.size()) };
            for (c, x) in row.iter_mut().enumerate() {
                *x = crate::dtype::load_f32(bytes, k_dtype, c);
            }
            rope.rotate(row, kv.position(b, tok) as f32, inv);
            sc.k_ptrs[j] = row.as_ptr() as *const u8;
        }
        k_dtype = DType::F32;
    }
    let s = &mut sc.s[..rows * t];
    // SAFETY: pointers come from the view (or k_rot), each valid for d elements.
    unsafe { simd::scores(q, rows, d, &sc.k_ptrs, k_dtype, s) };
    let masked = *blk.tokens.last().unwrap() > min_limit;
    for r in 0..rows {
        let sr = &mut s[r * t..(r + 1) * t];
        if let Some(c) = ctx.soft_cap {
            for x in sr.iter_mut() {
                *x = c * (*x / c).tanh();
            }
        }
        if masked {
            let lim = limit(r);
            for (x, &tok) in sr.iter_mut().zip(&blk.tokens) {
                if tok > lim {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let bm = sr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if bm == f32::NEG_INFINITY {
            sr.fill(0.0);
            continue;
        }
        let m_new = st.m[r].max(bm);
        let alpha = (st.m[r] - m_new).exp();
        let sum = simd::exp_sub_sum(sr, m_new);
        if alpha != 1.0 {
            for o in &mut st.o[r * d..(r + 1) * d] {
                *o *= alpha;
            }
        }
        st.l[r] = st.l[r] * alpha + sum;
        st.m[r] = m_new;
    }
    // SAFETY: as above, for the value rows.
    unsafe { simd::accumulate(&mut st.o, rows, d, &sc.v_ptrs, kv.dtype(), s) };
}

/// Merge partial states (normalised output, LSE) into one, in place into `acc`.
pub(crate) fn merge_into(acc_o: &mut [f32], acc_lse: &mut f32, o: &[f32], lse: f32) {
    if lse == f32::NEG_INFINITY {
        return;
    }
    if *acc_lse == f32::NEG_INFINITY {
        acc_o.copy_from_slice(o);
        *acc_lse = lse;
        return;
    }
    let m = acc_lse.max(lse);
    let (wa, wb) = ((*acc_lse - m).exp(), (lse - m).exp());
    let inv = 1.0 / (wa + wb);
    for (a, &b) in acc_o.iter_mut().zip(o) {
        *a = (*a * wa + b * wb) * inv;
    }
    *acc_lse = m + (wa + wb).ln();
}

/// One task's result: query rows `first_token..` of `heads`, normalised outputs and LSEs.
pub(crate) struct Partial {
    pub token: usize,
    pub head: usize,
    pub out: Vec<f32>,
    pub lse: f32,
}

/// Scale the query rows of `q` (`[n, hq, d]`) into a contiguous f32 buffer.
pub(crate) fn scaled_queries(q: &TensorView, scale: f32) -> Vec<f32> {
    let (n, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let mut buf = vec![0f32; n * hq * d];
    buf.par_chunks_mut(hq * d).enumerate().for_each(|(i, row)| {
        for h in 0..hq {
            q.read_row(&[i, h], &mut row[h * d..(h + 1) * d]);
        }
        for x in row.iter_mut() {
            *x *= scale;
        }
    });
    buf
}

/// Write finished rows into `out` and `lse`.
pub(crate) fn write_partials(parts: &[Partial], hq: usize, out: &mut TensorViewMut, mut lse: Option<&mut [f32]>) {
    for p in parts {
        out.write_row(&[p.token, p.head], &p.out);
        if let Some(l) = lse.as_deref_mut() {
            l[p.token * hq + p.head] = p.lse;
        }
    }
}
