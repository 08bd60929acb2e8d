//! The forward pass. Every KV-cache and attention operation goes through kvsieve: slots
//! come from `KvCache::append`, K and V of each layer are stored with `KvCache::write`,
//! and attention runs as `KvCache::prefill_with_policy` (several new tokens of one
//! sequence) or `KvCache::decode_with_policy` (one new token for each of a batch of
//! sequences).
//!
//! A [`Kv`] holds a cache with keys stored after RoPE (what dense attention, page bounds and
//! GemFilter read) and, optionally, a twin with keys stored before RoPE (what position
//! remapping needs: StreamingLLM's contiguous positions, the Λ-mask's capped distances).
//! Sequences are created, forked and freed in both at once, so their ids agree; a context
//! prefilled once can fill both (`Step::mirror`), and each policy then decodes in the cache
//! its positions need.

use std::time::Instant;

use kvsieve::attention::{apply_rope, AttentionParams, PositionMode};
use kvsieve::{CacheConfig, DType, KeyRope, KvCache, Policy, SeqId, TensorView, TensorViewMut};
use rayon::prelude::*;

use crate::matmul::matmul;
use crate::model::Model;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Which cache of a [`Kv`] attention reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Keys stored after RoPE.
    Post,
    /// Keys stored before RoPE (RoPE applied by kvsieve when it reads them).
    Pre,
}

/// The side a policy needs: remapped positions need keys stored before RoPE.
pub fn side_for(policy: &Policy, num_layers: usize) -> Side {
    if (0..num_layers).any(|l| policy.position_mode(l) != PositionMode::Original) {
        Side::Pre
    } else {
        Side::Post
    }
}

pub struct Kv {
    pub post: KvCache,
    pub pre: Option<KvCache>,
}

impl Kv {
    /// Caches for `model` with room for `tokens` tokens (rounded up to pages, plus a margin
    /// of `extra_pages`), f16 storage, NHD pages of `page_size`; with a pre-RoPE twin when
    /// `with_pre` is set.
    pub fn new(model: &Model, tokens: usize, page_size: usize, extra_pages: usize, with_pre: bool) -> Result<Kv> {
        let c = &model.cfg;
        let cfg = CacheConfig::new(c.num_layers, c.num_kv_heads, c.head_dim, page_size, tokens.div_ceil(page_size) + extra_pages)
            .with_dtype(DType::F16);
        let pre = if with_pre { Some(KvCache::new(cfg.with_key_rope(KeyRope::PreRope).with_key_bounds(false))?) } else { None };
        Ok(Kv { post: KvCache::new(cfg)?, pre })
    }

    pub fn cache(&self, side: Side) -> &KvCache {
        match side {
            Side::Post => &self.post,
            Side::Pre => self.pre.as_ref().expect("a Kv with a pre-RoPE cache"),
        }
    }

    fn cache_mut(&mut self, side: Side) -> &mut KvCache {
        match side {
            Side::Post => &mut self.post,
            Side::Pre => self.pre.as_mut().expect("a Kv with a pre-RoPE cache"),
        }
    }

    pub fn create(&mut self) -> SeqId {
        let id = self.post.create_sequence();
        if let Some(p) = self.pre.as_mut() {
            let twin = p.create_sequence();
            assert_eq!(twin, id, "twin caches create sequences in lockstep");
        }
        id
    }

    /// Fork a sequence in both caches (prefix sharing: no copy until a write).
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let f = self.post.fork(id)?;
        if let Some(p) = self.pre.as_mut() {
            let twin = p.fork(id)?;
            assert_eq!(twin, f, "twin caches fork in lockstep");
        }
        Ok(f)
    }

    pub fn free(&mut self, id: SeqId) -> Result<()> {
        self.post.free_sequence(id)?;
        if let Some(p) = self.pre.as_mut() {
            p.free_sequence(id)?;
        }
        Ok(())
    }
}

/// Which logits a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// One row per sequence: its last token's.
    Last,
    /// Every new token's row.
    All,
}

/// How one forward step runs.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub side: Side,
    /// Also store keys (before RoPE) and values in the pre-RoPE cache: a context prefilled
    /// once for policies of both sides.
    pub mirror: bool,
    pub policy: &'a Policy,
    pub logits: Logits,
    /// Run only the first `n` layers (no logits then).
    pub layers: Option<usize>,
    /// Keep every layer's query of the last new token, after RoPE (for GemFilter).
    pub capture_queries: bool,
}

impl<'a> Step<'a> {
    pub fn new(policy: &'a Policy) -> Self {
        Step { side: Side::Post, mirror: false, policy, logits: Logits::Last, layers: None, capture_queries: false }
    }
}

/// What a step produced.
#[derive(Default)]
pub struct StepOut {
    /// `[rows, vocab]`, rows as asked by [`Logits`].
    pub logits: Vec<f32>,
    /// Per layer run, the last new token's queries `[num_heads * head_dim]` after RoPE.
    pub queries: Vec<Vec<f32>>,
}

/// Counters kept across steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Seconds in kvsieve attention calls (selection included).
    pub attention_secs: f64,
    /// Seconds in kvsieve cache writes.
    pub write_secs: f64,
    /// Decode attention: sequence-steps (one query token of one sequence through all layers).
    pub decode_steps: usize,
    /// Seconds of decode attention over those steps.
    pub decode_attention_secs: f64,
    /// Bytes of K and V rows read by decode attention, plus page key bounds scanned.
    pub decode_kv_bytes: f64,
    /// Bytes dense decode attention would have read over the same steps.
    pub decode_dense_kv_bytes: f64,
}

pub struct Engine<'m> {
    pub model: &'m Model,
    pub stats: Stats,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
            *o = v * s * g;
        }
    });
}

fn positions_of(cache: &KvCache, seq: SeqId, n: usize) -> Result<Vec<i32>> {
    let p = cache.positions(seq)?;
    Ok(p[p.len() - n..].to_vec())
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m Model) -> Self {
        Engine { model, stats: Stats::default() }
    }

    /// Run new tokens through the model. With one sequence, `tokens` are its new tokens (a
    /// prefill, or a decode step when there is one); with several, one token each (a
    /// batched decode step). Appends the tokens to the caches.
    pub fn forward(&mut self, kv: &mut Kv, seqs: &[SeqId], tokens: &[u32], step: &Step) -> Result<StepOut> {
        let m = self.model;
        let c = &m.cfg;
        let n = tokens.len();
        if seqs.is_empty() || n == 0 || (seqs.len() > 1 && n != seqs.len()) {
            return Err(format!("forward: {} sequences and {n} tokens (one sequence with any tokens, or one token per sequence)", seqs.len()).into());
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(format!("token {t} is outside the vocabulary of {}", c.vocab_size).into());
        }
        if step.mirror && kv.pre.is_none() {
            return Err("Step::mirror needs a Kv with a pre-RoPE cache".into());
        }
        let decode = n == seqs.len();
        // Rows of each sequence: (seq, first row, rows).
        let groups: Vec<(SeqId, usize, usize)> = if seqs.len() == 1 { vec![(seqs[0], 0, n)] } else { seqs.iter().enumerate().map(|(i, &s)| (s, i, 1)).collect() };
        let sides: Vec<Side> = if step.mirror { vec![step.side, if step.side == Side::Post { Side::Pre } else { Side::Post }] } else { vec![step.side] };
        let mut starts = Vec::with_capacity(groups.len());
        for &(seq, _, rows) in &groups {
            starts.push(kv.cache(step.side).seq_len(seq)?);
            for &side in &sides {
                kv.cache_mut(side).append(seq, rows, None)?;
            }
        }
        let mut positions = Vec::with_capacity(n);
        for &(seq, _, rows) in &groups {
            positions.extend(positions_of(kv.cache(step.side), seq, rows)?);
        }

        let (d, hd, hq, hk) = (c.d_model, c.head_dim, c.num_heads, c.num_kv_heads);
        let rope = c.rope();
        let mut x = vec![0f32; n * d];
        for (i, &t) in tokens.iter().enumerate() {
            x[i * d..(i + 1) * d].copy_from_slice(m.tok_embd.row(t as usize));
        }
        let mut xn = vec![0f32; n * d];
        let mut q = vec![0f32; n * hq * hd];
        let mut k = vec![0f32; n * hk * hd];
        let mut v = vec![0f32; n * hk * hd];
        let mut att = vec![0f32; n * hq * hd];
        let mut proj = vec![0f32; n * d];
        let mut gate = vec![0f32; n * c.d_ff];
        let mut up = vec![0f32; n * c.d_ff];
        let mut out = StepOut::default();
        let layers = step.layers.unwrap_or(c.num_layers).min(c.num_layers);
        let params_post = AttentionParams::default();
        let params_pre = AttentionParams { rope: Some(rope), ..AttentionParams::default() };

        for (li, layer) in m.layers[..layers].iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut xn);
            matmul(&xn, n, &layer.wq, &mut q);
            matmul(&xn, n, &layer.wk, &mut k);
            matmul(&xn, n, &layer.wv, &mut v);

            let t0 = Instant::now();
            if sides.contains(&Side::Pre) {
                self.write(kv.cache_mut(Side::Pre), &groups, &starts, li, &k, &v)?;
            }
            if step.side == Side::Post || step.capture_queries {
                apply_rope(&mut TensorViewMut::new(&mut q, &[n, hq, hd])?, &positions, &rope)?;
            }
            if sides.contains(&Side::Post) {
                apply_rope(&mut TensorViewMut::new(&mut k, &[n, hk, hd])?, &positions, &rope)?;
                self.write(kv.cache_mut(Side::Post), &groups, &starts, li, &k, &v)?;
            }
            if step.capture_queries {
                out.queries.push(q[(n - 1) * hq * hd..].to_vec());
                if step.side == Side::Pre {
                    // Queries go to a pre-RoPE cache unrotated: undo by recomputing.
                    matmul(&xn, n, &layer.wq, &mut q);
                }
            }
            self.stats.write_secs += t0.elapsed().as_secs_f64();

            let cache = kv.cache(step.side);
            let params = if step.side == Side::Pre { &params_pre } else { &params_post };
            let qv = TensorView::new(&q, &[n, hq, hd])?;
            let mut ov = TensorViewMut::new(&mut att, &[n, hq, hd])?;
            let t0 = Instant::now();
            if decode {
                let sels = cache.decode_with_policy(li, seqs, &qv, &mut ov, None, step.policy, params)?;
                let dt = t0.elapsed().as_secs_f64();
                self.stats.decode_attention_secs += dt;
                self.count_decode_bytes(cache, seqs, li, step.policy, &sels)?;
            } else {
                cache.prefill_with_policy(li, seqs, &qv, &[0, n as i32], &mut ov, None, step.policy, params)?;
            }
            self.stats.attention_secs += t0.elapsed().as_secs_f64();

            matmul(&att, n, &layer.wo, &mut proj);
            x.par_iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut xn);
            matmul(&xn, n, &layer.w_gate, &mut gate);
            matmul(&xn, n, &layer.w_up, &mut up);
            gate.par_iter_mut().zip(&up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            matmul(&gate, n, &layer.w_down, &mut proj);
            x.par_iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        if decode {
            self.stats.decode_steps += seqs.len();
        }
        if layers < c.num_layers || step.logits == Logits::None {
            return Ok(out);
        }
        let rows: Vec<usize> = match step.logits {
            Logits::All => (0..n).collect(),
            _ => groups.iter().map(|&(_, first, rows)| first + rows - 1).collect(),
        };
        let mut h = vec![0f32; rows.len() * d];
        for (o, &r) in h.chunks_mut(d).zip(&rows) {
            o.copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        let mut hn = vec![0f32; h.len()];
        rms_norm(&h, &m.out_norm, c.rms_eps, &mut hn);
        out.logits = vec![0f32; rows.len() * c.vocab_size];
        matmul(&hn, rows.len(), m.lm_head(), &mut out.logits);
        Ok(out)
    }

    fn write(&mut self, cache: &mut KvCache, groups: &[(SeqId, usize, usize)], starts: &[usize], layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (hk, hd) = (self.model.cfg.num_kv_heads, self.model.cfg.head_dim);
        let row = hk * hd;
        for (&(seq, first, rows), &start) in groups.iter().zip(starts) {
            let kr = &k[first * row..(first + rows) * row];
            let vr = &v[first * row..(first + rows) * row];
            cache.write(seq, layer, start, &TensorView::new(kr, &[rows, hk, hd])?, &TensorView::new(vr, &[rows, hk, hd])?)?;
        }
        Ok(())
    }

    /// KV bytes a decode step read at one layer: the selected K and V rows, plus the page
    /// key bounds that page-bound selection scanned; and what dense attention reads.
    fn count_decode_bytes(&mut self, cache: &KvCache, seqs: &[SeqId], layer: usize, policy: &Policy, sels: &[kvsieve::Selection]) -> Result<()> {
        let c = cache.config();
        let row = 2.0 * (c.head_dim * c.dtype.size()) as f64;
        for (b, &seq) in seqs.iter().enumerate() {
            let len = cache.seq_len(seq)?;
            let dense = (len * c.num_kv_heads) as f64 * row;
            self.stats.decode_dense_kv_bytes += dense;
            match sels.get(b) {
                None => self.stats.decode_kv_bytes += dense,
                Some(s) => {
                    self.stats.decode_kv_bytes += s.len() as f64 * row;
                    let paged = (0..c.num_kv_heads).filter(|&h| policy.spec(layer, h).pages.is_some_and(|p| p < len)).count();
                    self.stats.decode_kv_bytes += (len.div_ceil(c.page_size) * paged) as f64 * row;
                }
            }
        }
        Ok(())
    }
}

/// Log-softmax probability of `target` in a row of logits.
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    logits[target as usize] as f64 - mx - sum.ln()
}

/// The `k` most likely tokens of a row of logits with their probabilities.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, (logits[i as usize] as f64 - mx).exp() / sum)).collect()
}

pub fn argmax(logits: &[f32]) -> u32 {
    top_k(logits, 1)[0].0
}
