//! The CPU attention engine shared by decode and prefill: online softmax over blocks of
//! tokens of one sequence and one KV head, for a set of query rows (the GQA group's heads,
//! times the query tokens of a prefill tile).

use crate::attention::rope::RopeTable;
use crate::attention::{AttentionParams, PositionMode, RopeConfig, RopeStyle};
use crate::cpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::PagedKv;
use rayon::prelude::*;
use std::sync::Arc;

use crate::tensor::{TensorView, TensorViewMut};
use crate::KeyRope;

/// Tokens scored per block.
pub(crate) const BLOCK: usize = 32;

/// Validated, per-call constants.
pub(crate) struct Ctx<'a> {
    pub kv: &'a PagedKv<'a>,
    pub num_qo_heads: usize,
    pub group: usize,
    pub d: usize,
    pub scale: f32,
    pub soft_cap: Option<f32>,
    /// RoPE applied to keys and queries at read time (keys stored before RoPE): the
    /// configuration, its inverse frequencies and the shared rotation table.
    pub rope: Option<(RopeConfig, Vec<f32>, Arc<RopeTable>)>,
    pub positions: PositionMode,
}

impl<'a> Ctx<'a> {
    /// Check q, out and lse against the view; `tokens` is the number of query rows.
    pub fn new(
        kv: &'a PagedKv<'a>,
        q: &TensorView,
        out: &TensorViewMut,
        lse: Option<&[f32]>,
        params: &AttentionParams,
        tokens_param: &str,
    ) -> Result<Self> {
        let d = kv.head_dim();
        let hk = kv.num_kv_heads();
        if q.shape().len() != 3 || q.shape()[2] != d {
            return Err(Error::shape("q", format!("[{tokens_param}, num_qo_heads, {d}]"), format!("{:?}", q.shape())));
        }
        let (n, hq) = (q.shape()[0], q.shape()[1]);
        if hq == 0 || hq % hk != 0 {
            return Err(Error::shape(
                "q",
                format!("num_qo_heads a positive multiple of num_kv_heads {hk}"),
                format!("{hq} query heads"),
            ));
        }
        out.expect_shape("out", &[Some(n), Some(hq), Some(d)])?;
        if let Some(l) = lse {
            if l.len() != n * hq {
                return Err(Error::shape(
                    "lse",
                    format!("[{n}, {hq}] ({} values)", n * hq),
                    format!("{} values", l.len()),
                ));
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
                // Positions up to each sequence's length (contiguous numbering) and up to its last
                // token's stored position (usually the largest: appends number tokens upward,
                // and after eviction or compaction they exceed the length). Others are computed.
                let longest = (0..kv.batch_size())
                    .map(|b| {
                        let n = kv.seq_len(b);
                        n.max(n.checked_sub(1).map_or(0, |last| kv.position(b, last).max(0) as usize + 1))
                    })
                    .max()
                    .unwrap_or(0);
                Some((r, r.inv_freq(d), r.table(d, longest + 1)))
            }
            (KeyRope::PostRope, _) => None,
        };
        if rope.is_none() && params.positions != PositionMode::Original {
            return Err(Error::invalid(
                "positions",
                "PositionMode::Original for keys stored after RoPE (Contiguous and Capped re-rotate keys, which needs KeyRope::PreRope and a RopeConfig)",
            ));
        }
        if let PositionMode::Capped { max_distance: 0 } = params.positions {
            return Err(Error::invalid("positions.max_distance", "at least 1"));
        }
        Ok(Ctx {
            kv,
            num_qo_heads: hq,
            group: hq / hk,
            d,
            scale,
            soft_cap: params.logit_soft_cap,
            rope,
            positions: params.positions,
        })
    }

    /// Rotate `rows` query rows (each `d` long) by `pos` when keys are read pre-RoPE.
    pub fn rotate_rows(&self, q: &mut [f32], pos: f32) {
        if let Some((rope, inv, table)) = &self.rope {
            for row in q.chunks_exact_mut(self.d) {
                rope.rotate_with(row, pos, inv, table);
            }
        }
    }

    /// Attend one set of query rows of sequence `b`, head `kh` to `tokens` (a slice of the
    /// head's full token list `all`, starting at list index `base`) under the position mode.
    /// `q` holds the scaled, unrotated rows; `q_token(r)` is row r's query token index and
    /// `limit`/`filter` restrict what each row sees.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_rows(
        &self,
        b: usize,
        kh: usize,
        q: &[f32],
        rows: usize,
        q_token: &(dyn Fn(usize) -> usize + Sync),
        all: Tokens,
        base: usize,
        tokens: Tokens,
        limit: &(dyn Fn(usize) -> usize + Sync),
        filter: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
        sc: &mut Scratch,
    ) -> RowState {
        let d = self.d;
        let kv = self.kv;
        let mut st = RowState::new(rows, d);
        let rows_per_token = rows.min(self.group).max(1);
        let rotate_each = |qr: &mut Vec<f32>, pos: &dyn Fn(usize) -> f32| {
            for (i, chunk) in qr.chunks_exact_mut(rows_per_token * d).enumerate() {
                self.rotate_rows(chunk, pos(i * rows_per_token));
            }
        };
        if self.rope.is_none() {
            attend(self, b, kh, q, rows, tokens, &Pass { key_pos: KeyPos::Stored, limit, filter }, &mut st, sc);
            return st;
        }
        let mut qr = q.to_vec();
        match self.positions {
            PositionMode::Original => {
                rotate_each(&mut qr, &|r| kv.position(b, q_token(r)) as f32);
                attend(self, b, kh, &qr, rows, tokens, &Pass { key_pos: KeyPos::Stored, limit, filter }, &mut st, sc);
            }
            PositionMode::Contiguous => {
                rotate_each(&mut qr, &|r| all.count_below(q_token(r)) as f32);
                attend(
                    self,
                    b,
                    kh,
                    &qr,
                    rows,
                    tokens,
                    &Pass { key_pos: KeyPos::Index(base), limit, filter },
                    &mut st,
                    sc,
                );
            }
            PositionMode::Capped { max_distance } => {
                // Near keys keep their true relative distance; far keys all sit at max_distance,
                // which a rotation of the query alone expresses (RoPE depends only on the difference).
                let m = max_distance as i64;
                let dist = |r: usize, t: usize| kv.position(b, q_token(r)) as i64 - kv.position(b, t) as i64;
                let near = |r: usize, t: usize| dist(r, t) < m && filter.is_none_or(|f| f(r, t));
                let far = |r: usize, t: usize| dist(r, t) >= m && filter.is_none_or(|f| f(r, t));
                rotate_each(&mut qr, &|r| kv.position(b, q_token(r)) as f32);
                attend(
                    self,
                    b,
                    kh,
                    &qr,
                    rows,
                    tokens,
                    &Pass { key_pos: KeyPos::Stored, limit, filter: Some(&near) },
                    &mut st,
                    sc,
                );
                qr.copy_from_slice(q);
                self.rotate_rows(&mut qr, max_distance as f32);
                let mut far_st = RowState::new(rows, d);
                attend(
                    self,
                    b,
                    kh,
                    &qr,
                    rows,
                    tokens,
                    &Pass { key_pos: KeyPos::Raw, limit, filter: Some(&far) },
                    &mut far_st,
                    sc,
                );
                st.absorb(&far_st, d);
            }
        }
        st
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

    /// Fold another state over a disjoint key set into this one.
    pub fn absorb(&mut self, other: &RowState, d: usize) {
        for r in 0..self.m.len() {
            let (m1, m2) = (self.m[r], other.m[r]);
            if m2 == f32::NEG_INFINITY {
                continue;
            }
            let m = m1.max(m2);
            let (a, b) = ((m1 - m).exp(), (m2 - m).exp());
            for (x, &y) in self.o[r * d..(r + 1) * d].iter_mut().zip(&other.o[r * d..(r + 1) * d]) {
                *x = *x * a + y * b;
            }
            self.l[r] = self.l[r] * a + other.l[r] * b;
            self.m[r] = m;
        }
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
    /// K and V rows read next, prefetched while this block is computed (see
    /// [`attend_block`]).
    pub(crate) ahead_k: Vec<*const u8>,
    pub(crate) ahead_v: Vec<*const u8>,
}

impl Scratch {
    pub fn new(rows: usize, d: usize) -> Self {
        Scratch {
            s: vec![0.0; rows * BLOCK],
            k_ptrs: Vec::with_capacity(BLOCK),
            v_ptrs: Vec::with_capacity(BLOCK),
            k_rot: vec![0.0; BLOCK * d],
            ahead_k: Vec::with_capacity(BLOCK),
            ahead_v: Vec::with_capacity(BLOCK),
        }
    }
}

/// Ascending token indices of one sequence that attention reads.
#[derive(Clone, Copy)]
pub(crate) enum Tokens<'a> {
    Range(usize, usize),
    List(&'a [u32]),
}

impl<'a> Tokens<'a> {
    pub fn len(&self) -> usize {
        match *self {
            Tokens::Range(s, e) => e.saturating_sub(s),
            Tokens::List(l) => l.len(),
        }
    }
    #[inline(always)]
    pub fn get(&self, i: usize) -> usize {
        match *self {
            Tokens::Range(s, _) => s + i,
            Tokens::List(l) => l[i] as usize,
        }
    }
    /// Number of leading tokens not greater than `limit`.
    pub fn count_upto(&self, limit: usize) -> usize {
        match *self {
            Tokens::Range(s, e) => e.min(limit.saturating_add(1)).saturating_sub(s),
            Tokens::List(l) => l.partition_point(|&t| (t as usize) <= limit),
        }
    }
    /// Number of tokens strictly below `t`.
    pub fn count_below(&self, t: usize) -> usize {
        if t == 0 {
            0
        } else {
            self.count_upto(t - 1)
        }
    }
    /// Entries `i0..i1`.
    pub fn slice(&self, i0: usize, i1: usize) -> Tokens<'a> {
        match *self {
            Tokens::Range(s, _) => Tokens::Range(s + i0, s + i1),
            Tokens::List(l) => Tokens::List(&l[i0..i1]),
        }
    }
}

/// Where the RoPE position of a key read in a pass comes from (keys stored before RoPE).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyPos {
    /// The position stored in the key's slot.
    Stored,
    /// Its index in the head's token list: `base` + index within the pass.
    Index(usize),
    /// No rotation: the query carries the whole relative rotation (LM-Infinite far keys).
    Raw,
}

/// Which keys one pass reads and how: row `r` sees token `t` if `t <= limit(r)` and
/// `filter(r, t)` (when given).
pub(crate) struct Pass<'f> {
    pub key_pos: KeyPos,
    pub limit: &'f (dyn Fn(usize) -> usize + Sync),
    pub filter: Option<&'f (dyn Fn(usize, usize) -> bool + Sync)>,
}

impl Pass<'_> {
    pub const ALL: Pass<'static> = Pass { key_pos: KeyPos::Stored, limit: &|_| usize::MAX, filter: None };
}

/// A block of at most [`BLOCK`] tokens of one sequence and where each lives.
#[derive(Default)]
pub(crate) struct Block {
    pub tokens: Vec<usize>,
    /// Index in the token list of the first token.
    first: usize,
    /// K and V of head 0 of each token; head `h` is `h * head stride` further.
    k0: Vec<*const u8>,
    v0: Vec<*const u8>,
    /// Keys stored before RoPE: each token's rotation for the fused score tile (a row of
    /// the shared table, or for a position it does not cover the token's row of `cs_rows`),
    /// found once for the pass `cs_for` and reused by every KV head of the block.
    cs: Vec<*const f32>,
    cs_rows: Vec<f32>,
    cs_for: Option<KeyPos>,
}

// SAFETY: the pointers are read-only addresses into a PagedKv shared by the workers.
unsafe impl Send for Block {}

impl Block {
    /// Load tokens `i0..i1` of `tokens`.
    pub fn fill(&mut self, kv: &PagedKv, b: usize, tokens: &Tokens, i0: usize, i1: usize) {
        self.tokens.clear();
        self.k0.clear();
        self.v0.clear();
        self.cs_for = None;
        self.first = i0;
        for i in i0..i1 {
            let t = tokens.get(i);
            let (page, slot) = kv.locate(b, t);
            self.tokens.push(t);
            self.k0.push(kv.k_ptr(page, slot, 0));
            self.v0.push(kv.v_ptr(page, slot, 0));
        }
    }

    /// Pointers to head `kh`'s K and V rows of the block's tokens, replacing `k` and `v`.
    pub(crate) fn head_rows(&self, kv: &PagedKv, kh: usize, k: &mut Vec<*const u8>, v: &mut Vec<*const u8>) {
        let es = kv.dtype().size();
        let (ko, vo) = (kh * kv.layout().k_strides[2] * es, kh * kv.layout().v_strides[2] * es);
        k.clear();
        v.clear();
        k.extend(self.k0.iter().map(|p| p.wrapping_add(ko)));
        v.extend(self.v0.iter().map(|p| p.wrapping_add(vo)));
    }
}

/// Attend `rows` query rows (`q`, already multiplied by the scale and rotated as the pass
/// needs) to `tokens` of sequence `b`, KV head `kh`, one block after another.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    ctx: &Ctx,
    b: usize,
    kh: usize,
    q: &[f32],
    rows: usize,
    tokens: Tokens,
    pass: &Pass,
    st: &mut RowState,
    sc: &mut Scratch,
) {
    let kv = ctx.kv;
    let max_limit = (0..rows).map(pass.limit).max().unwrap_or(0);
    let min_limit = (0..rows).map(pass.limit).min().unwrap_or(0);
    let n = tokens.count_upto(max_limit);
    let (mut cur, mut next) = (Block::default(), Block::default());
    cur.fill(kv, b, &tokens, 0, n.min(BLOCK));
    for i0 in (0..n).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(n);
        next.fill(kv, b, &tokens, i1, (i1 + BLOCK).min(n));
        next.head_rows(kv, kh, &mut sc.ahead_k, &mut sc.ahead_v);
        attend_block(ctx, b, kh, q, rows, &mut cur, pass, min_limit, st, sc);
        std::mem::swap(&mut cur, &mut next);
    }
}

/// Attend `rows` query rows to one block of tokens of KV head `kh` (see [`attend`]);
/// `min_limit` is the smallest `limit(r)`, so blocks below it skip the causal mask.
/// Memory and arithmetic overlap by prefetching: this block's V rows of the head before the
/// scores; the K rows of `sc.ahead_k` a few at a time between the scores' dot products; the
/// V rows of `sc.ahead_v` between the weighted sum's. The caller fills those two with the
/// rows it reads next (the next block's of this head, or, with heads innermost, the next
/// head's of this block): each is read about one call after its prefetch, while it is still
/// in the near caches (a whole block of heads later, they were not).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_block(
    ctx: &Ctx,
    b: usize,
    kh: usize,
    q: &[f32],
    rows: usize,
    blk: &mut Block,
    pass: &Pass,
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
    blk.head_rows(kv, kh, &mut sc.k_ptrs, &mut sc.v_ptrs);
    // This block's V rows, asked for before the scores: most are on their way already (the
    // previous call's weighted sum prefetched them), and the scores give them time to arrive.
    for &v in &sc.v_ptrs {
        cpu::prefetch(v, d * kv.dtype().size());
    }
    let mut k_dtype = kv.dtype();
    let mut ahead_k = &sc.ahead_k[..];
    let s = &mut sc.s[..rows * t];
    let rope = ctx.rope.as_ref().filter(|_| pass.key_pos != KeyPos::Raw);
    let first = blk.first;
    let key_pos = |j: usize, tok: usize| match pass.key_pos {
        KeyPos::Index(base) => (base + first + j) as f32,
        _ => kv.position(b, tok) as f32,
    };
    // Keys stored before RoPE: rotated in registers inside the score tile where a fused
    // kernel applies, each key by its table row (or a row computed like one), found once
    // per block and pass for all KV heads.
    let mut fused = false;
    if let Some((rope, inv, table)) = rope {
        let rot = 2 * inv.len();
        if blk.cs_for != Some(pass.key_pos) {
            // Key j's computed row, when needed, is row j of cs_rows (sized before any
            // pointer into it is taken).
            if blk.cs_rows.len() < t * rot {
                blk.cs_rows.resize(t * rot, 0.0);
            }
            blk.cs.clear();
            for (j, &tok) in blk.tokens.iter().enumerate() {
                let pos = key_pos(j, tok);
                let row = match table.row(pos).filter(|r| r.len() == rot) {
                    Some(row) => row,
                    None => {
                        let row = &mut blk.cs_rows[j * rot..(j + 1) * rot];
                        rope.rotation_row(pos, inv, row);
                        row
                    }
                };
                blk.cs.push(row.as_ptr());
            }
            blk.cs_for = Some(pass.key_pos);
        }
        let how = (&blk.cs[..], rot, rope.style == RopeStyle::HalfSplit);
        // SAFETY: key pointers come from the view (d valid elements each); each cs pointer
        // is valid for `rot` floats (a table row or a row of cs_rows, not changed since).
        fused = unsafe { cpu::scores_rope_ahead(q, rows, d, &sc.k_ptrs, k_dtype, how, s, ahead_k) };
    }
    if let (Some((rope, inv, table)), false) = (rope, fused) {
        // The keys are rotated into f32 rows here, so the next block's stored rows are
        // prefetched here too, with their own size.
        let mut ahead = cpu::Ahead::new(&sc.ahead_k, d * k_dtype.size());
        ahead_k = &[];
        for (j, &tok) in blk.tokens.iter().enumerate() {
            ahead.upto(j + 1);
            let row = &mut sc.k_rot[j * d..(j + 1) * d];
            // SAFETY: k_ptrs[j] points at d valid elements (PagedKv contract).
            let bytes = unsafe { std::slice::from_raw_parts(sc.k_ptrs[j], d * k_dtype.size()) };
            crate::cpu::convert::load_row(bytes, k_dtype, row);
            rope.rotate_with(row, key_pos(j, tok), inv, table);
            sc.k_ptrs[j] = row.as_ptr() as *const u8;
        }
        ahead.upto(usize::MAX);
        k_dtype = DType::F32;
    }
    if !fused {
        // SAFETY: pointers come from the view (or k_rot), each valid for d elements.
        unsafe { cpu::scores_ahead(q, rows, d, &sc.k_ptrs, k_dtype, s, ahead_k) };
    }
    let masked = *blk.tokens.last().unwrap() > min_limit || pass.filter.is_some();
    for r in 0..rows {
        let sr = &mut s[r * t..(r + 1) * t];
        if let Some(c) = ctx.soft_cap {
            for x in sr.iter_mut() {
                *x = c * (*x / c).tanh();
            }
        }
        if masked {
            let lim = (pass.limit)(r);
            for (x, &tok) in sr.iter_mut().zip(&blk.tokens) {
                if tok > lim || pass.filter.is_some_and(|f| !f(r, tok)) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let bm = cpu::max(sr);
        if bm == f32::NEG_INFINITY {
            sr.fill(0.0);
            continue;
        }
        let m_new = st.m[r].max(bm);
        let alpha = (st.m[r] - m_new).exp();
        let sum = cpu::exp_sub_sum(sr, m_new);
        if alpha != 1.0 {
            for o in &mut st.o[r * d..(r + 1) * d] {
                *o *= alpha;
            }
        }
        st.l[r] = st.l[r] * alpha + sum;
        st.m[r] = m_new;
    }
    // SAFETY: as above, for the value rows.
    unsafe { cpu::accumulate_ahead(&mut st.o, rows, d, &sc.v_ptrs, kv.dtype(), s, &sc.ahead_v) };
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

/// Finished query rows (normalised outputs `[rows][d]` and LSEs `[rows]`) in one buffer,
/// allocated fallibly: how many rows there are comes from the caller's batch, heads,
/// sequence lengths and chunk size.
pub(crate) struct Rows {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub d: usize,
}

impl Rows {
    /// `rows` rows of zeros with LSE `-inf` (a row that saw no key).
    pub fn new(rows: usize, d: usize, what: &str) -> Result<Self> {
        Ok(Rows {
            out: crate::alloc::zeroed_vec(crate::alloc::mul(rows, d, what)?, what)?,
            lse: crate::alloc::filled_vec(rows, f32::NEG_INFINITY, what)?,
            d,
        })
    }

    /// Row `r`: its output and its LSE slot.
    pub fn row(&mut self, r: usize) -> (&mut [f32], &mut f32) {
        (&mut self.out[r * self.d..(r + 1) * self.d], &mut self.lse[r])
    }

    /// Write row `token * hq + head` to `out[token, head]` and `lse[token * hq + head]`,
    /// for every row.
    pub fn write(&self, hq: usize, out: &mut TensorViewMut, lse: Option<&mut [f32]>) {
        for (r, o) in self.out.chunks_exact(self.d).enumerate() {
            out.write_row(&[r / hq, r % hq], o);
        }
        if let Some(l) = lse {
            l[..self.lse.len()].copy_from_slice(&self.lse);
        }
    }
}

/// Scale the query rows of `q` (`[n, hq, d]`) into a contiguous f32 buffer.
pub(crate) fn scaled_queries(q: &TensorView, scale: f32) -> Result<Vec<f32>> {
    let (n, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let mut buf = crate::alloc::zeroed_vec(n * hq * d, "scaled queries")?;
    buf.par_chunks_mut(hq * d).enumerate().for_each(|(i, row)| {
        for h in 0..hq {
            q.read_row(&[i, h], &mut row[h * d..(h + 1) * d]);
        }
        for x in row.iter_mut() {
            *x *= scale;
        }
    });
    Ok(buf)
}
