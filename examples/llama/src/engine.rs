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

use std::collections::HashMap;
use std::time::Instant;

use kvsieve::attention::{apply_rope, AttentionParams, PositionMode};
use kvsieve::runtime::PolicySelection;
use kvsieve::{CacheConfig, ClusterIndexSet, DType, KeyRope, KvCache, Policy, SeqId, TensorView, TensorViewMut};
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
        Kv::with_layers(model, model.cfg.num_layers, tokens, page_size, extra_pages, with_pre)
    }

    /// As [`Kv::new`] with pages for only the first `layers` layers (a forward step limited
    /// to those layers, such as GemFilter's first pass, needs no more).
    pub fn with_layers(
        model: &Model,
        layers: usize,
        tokens: usize,
        page_size: usize,
        extra_pages: usize,
        with_pre: bool,
    ) -> Result<Kv> {
        let c = &model.cfg;
        let cfg =
            CacheConfig::new(layers, c.num_kv_heads, c.head_dim, page_size, tokens.div_ceil(page_size) + extra_pages)
                .with_dtype(DType::F16);
        let pre = if with_pre {
            Some(KvCache::new(cfg.with_key_rope(KeyRope::PreRope).with_key_bounds(false))?)
        } else {
            None
        };
        Ok(Kv { post: KvCache::new(cfg)?, pre })
    }

    pub fn cache(&self, side: Side) -> &KvCache {
        match side {
            Side::Post => &self.post,
            Side::Pre => self.pre.as_ref().expect("a Kv with a pre-RoPE cache"),
        }
    }

    pub fn cache_mut(&mut self, side: Side) -> &mut KvCache {
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

/// One sequence in a forward step: which cache its attention reads and under which policy.
#[derive(Clone, Copy)]
pub struct Lane<'a> {
    pub seq: SeqId,
    pub side: Side,
    pub policy: &'a Policy,
}

impl<'a> Lane<'a> {
    /// A lane in the cache `policy` needs.
    pub fn new(seq: SeqId, policy: &'a Policy, num_layers: usize) -> Self {
        Lane { seq, side: side_for(policy, num_layers), policy }
    }
}

/// How one forward step runs.
#[derive(Clone, Copy)]
pub struct Step {
    /// Also store K and V in the other cache of the [`Kv`] (keys before RoPE in the
    /// pre-RoPE one): a context prefilled once for policies of both sides.
    pub mirror: bool,
    pub logits: Logits,
    /// Run only the first `n` layers (no logits then).
    pub layers: Option<usize>,
    /// Keep every layer's query of the last new token, after RoPE (for GemFilter).
    pub capture_queries: bool,
}

impl Default for Step {
    fn default() -> Self {
        Step { mirror: false, logits: Logits::Last, layers: None, capture_queries: false }
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

/// Decode counters of one sequence, kept across steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Decode steps (one query token through all layers).
    pub decode_steps: usize,
    /// Seconds of decode attention over those steps.
    pub decode_attention_secs: f64,
    /// Bytes of K and V rows read by decode attention, plus page key bounds scanned and
    /// cluster centroids scored.
    pub decode_kv_bytes: f64,
    /// Bytes dense decode attention would have read over the same steps of this sequence
    /// (after any eviction, what the sequence still holds).
    pub decode_dense_kv_bytes: f64,
    /// With [`Engine::probe`]: fact tokens held by the (layer, KV head) selections of sparse
    /// decode steps, and the fact's length times those selections (dense layers count whole).
    pub fact_tokens_read: usize,
    pub fact_tokens_total: usize,
}

impl Stats {
    /// Mean decode attention seconds per step (all layers, selection included).
    pub fn attention_secs_per_step(&self) -> f64 {
        self.decode_attention_secs / self.decode_steps.max(1) as f64
    }
    /// Share of the planted fact's tokens the selections held (1 for dense).
    pub fn fact_recall(&self) -> f64 {
        if self.fact_tokens_total == 0 {
            return f64::NAN;
        }
        self.fact_tokens_read as f64 / self.fact_tokens_total as f64
    }
    /// Mean KV bytes read per decode step (all layers).
    pub fn kv_bytes_per_step(&self) -> f64 {
        self.decode_kv_bytes / self.decode_steps.max(1) as f64
    }
}

pub struct Engine<'m> {
    pub model: &'m Model,
    /// Decode counters per sequence.
    pub stats: HashMap<SeqId, Stats>,
    /// Seconds in kvsieve attention calls, all steps (selection included).
    pub attention_secs: f64,
    /// Cluster indexes of the sequences whose policy uses centroid retrieval (`clusters=`),
    /// built by [`Engine::build_clusters`] after prefill.
    pub clusters: ClusterIndexSet,
    /// Token range of a planted fact: sparse decode steps then count how much of it each
    /// (layer, KV head) selection holds ([`Stats::fact_tokens_read`]).
    pub probe: Option<std::ops::Range<usize>>,
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
        Engine { model, stats: HashMap::new(), attention_secs: 0.0, clusters: ClusterIndexSet::new(), probe: None }
    }

    /// Build the cluster indexes of a lane for the layers where its policy uses
    /// `clusters=`, from the cache the lane reads: post-RoPE keys as stored, or the raw keys
    /// of the pre-RoPE cache (scored at the capped distance: use `clusters=` there with
    /// capped positions). Returns the seconds it took (0 without `clusters=`).
    pub fn build_clusters(&mut self, kv: &Kv, lane: &Lane) -> Result<f64> {
        let t0 = Instant::now();
        let n = self.clusters.build(kv.cache(lane.side), lane.seq, lane.policy)?;
        Ok(if n > 0 { t0.elapsed().as_secs_f64() } else { 0.0 })
    }

    /// Give `to` a copy of `from`'s cluster indexes (forks of one context share them).
    pub fn copy_clusters(&mut self, from: SeqId, to: SeqId, num_layers: usize) {
        for layer in 0..num_layers {
            let ix = self.clusters.get(from, layer).cloned();
            let keys = self.clusters.indexed_keys(from, layer);
            if let (Some(ix), Some(keys)) = (ix, keys) {
                self.clusters.insert(to, layer, ix, keys);
            }
        }
    }

    /// Run new tokens through the model. With one lane, `tokens` are its sequence's new
    /// tokens (a prefill, or a decode step when there is one); with several, one token each
    /// (a batched decode step: the linear layers run once for the batch, attention per
    /// group of lanes sharing a cache and a policy). Appends the tokens to the caches.
    pub fn forward(&mut self, kv: &mut Kv, lanes: &[Lane], tokens: &[u32], step: &Step) -> Result<StepOut> {
        let m = self.model;
        let c = &m.cfg;
        let n = tokens.len();
        if lanes.is_empty() || n == 0 || (lanes.len() > 1 && n != lanes.len()) {
            return Err(format!(
                "forward: {} lanes and {n} tokens (one lane with any tokens, or one token per lane)",
                lanes.len()
            )
            .into());
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(format!("token {t} is outside the vocabulary of {}", c.vocab_size).into());
        }
        let needs_pre = step.mirror || lanes.iter().any(|l| l.side == Side::Pre);
        if needs_pre && kv.pre.is_none() {
            return Err("a lane on the pre-RoPE side (or Step::mirror) needs a Kv with a pre-RoPE cache".into());
        }
        for l in lanes {
            l.policy.validate(c.num_layers, c.num_kv_heads)?;
        }
        let decode = n == lanes.len();
        // Per lane: first row, rows, start in its caches, whether it writes pre / post keys.
        struct Rows {
            first: usize,
            rows: usize,
            start: usize,
            pre: bool,
            post: bool,
        }
        let mut rows = Vec::with_capacity(lanes.len());
        let mut positions = Vec::with_capacity(n);
        for (i, l) in lanes.iter().enumerate() {
            let (first, count) = if decode { (i, 1) } else { (0, n) };
            let r = Rows {
                first,
                rows: count,
                start: kv.cache(l.side).seq_len(l.seq)?,
                pre: l.side == Side::Pre || step.mirror,
                post: l.side == Side::Post || step.mirror,
            };
            for (side, on) in [(Side::Pre, r.pre), (Side::Post, r.post)] {
                if on {
                    kv.cache_mut(side).append(l.seq, count, None)?;
                }
            }
            positions.extend(positions_of(kv.cache(l.side), l.seq, count)?);
            rows.push(r);
        }
        // Attention groups: lanes with the same cache and policy (one call each).
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, l) in lanes.iter().enumerate() {
            match groups.iter_mut().find(|g| lanes[g[0]].side == l.side && std::ptr::eq(lanes[g[0]].policy, l.policy)) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
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
        let (qrow, krow) = (hq * hd, hk * hd);

        for (li, layer) in m.layers[..layers].iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut xn);
            matmul(&xn, n, &layer.wq, &mut q);
            matmul(&xn, n, &layer.wk, &mut k);
            matmul(&xn, n, &layer.wv, &mut v);

            // Keys before RoPE to pre-RoPE caches, then rotate and store in post-RoPE ones;
            // queries are rotated for lanes reading post-RoPE keys (kvsieve rotates the
            // others' when it reads).
            for (l, r) in lanes.iter().zip(&rows) {
                let (a, b) = (r.first, r.first + r.rows);
                let pos = &positions[a..b];
                if r.pre {
                    write(
                        kv.cache_mut(Side::Pre),
                        l.seq,
                        li,
                        r.start,
                        &k[a * krow..b * krow],
                        &v[a * krow..b * krow],
                        hk,
                        hd,
                    )?;
                }
                if r.post {
                    apply_rope(&mut TensorViewMut::new(&mut k[a * krow..b * krow], &[r.rows, hk, hd])?, pos, &rope)?;
                    write(
                        kv.cache_mut(Side::Post),
                        l.seq,
                        li,
                        r.start,
                        &k[a * krow..b * krow],
                        &v[a * krow..b * krow],
                        hk,
                        hd,
                    )?;
                }
                if l.side == Side::Post {
                    apply_rope(&mut TensorViewMut::new(&mut q[a * qrow..b * qrow], &[r.rows, hq, hd])?, pos, &rope)?;
                }
            }
            if step.capture_queries {
                let mut last = q[(n - 1) * qrow..].to_vec();
                if lanes[lanes.len() - 1].side == Side::Pre {
                    let p = [positions[n - 1]];
                    apply_rope(&mut TensorViewMut::new(&mut last, &[1, hq, hd])?, &p, &rope)?;
                }
                out.queries.push(last);
            }

            let t0 = Instant::now();
            for g in &groups {
                let l0 = lanes[g[0]];
                let cache = kv.cache(l0.side);
                let params = if l0.side == Side::Pre { &params_pre } else { &params_post };
                if decode {
                    let ids: Vec<SeqId> = g.iter().map(|&i| lanes[i].seq).collect();
                    let mut qg = Vec::with_capacity(g.len() * qrow);
                    for &i in g {
                        qg.extend_from_slice(&q[i * qrow..(i + 1) * qrow]);
                    }
                    let mut og = vec![0f32; g.len() * qrow];
                    let tg = Instant::now();
                    let sels: Vec<PolicySelection> = cache.decode_with_clusters(
                        li,
                        &ids,
                        &TensorView::new(&qg, &[g.len(), hq, hd])?,
                        l0.policy,
                        &self.clusters,
                        &mut TensorViewMut::new(&mut og, &[g.len(), hq, hd])?,
                        None,
                        params,
                    )?;
                    let dt = tg.elapsed().as_secs_f64() / g.len() as f64;
                    for (j, &i) in g.iter().enumerate() {
                        att[i * qrow..(i + 1) * qrow].copy_from_slice(&og[j * qrow..(j + 1) * qrow]);
                        self.count_decode(cache, lanes[i].seq, li, l0.policy, sels.get(j), dt)?;
                    }
                } else {
                    let qv = TensorView::new(&q, &[n, hq, hd])?;
                    let mut ov = TensorViewMut::new(&mut att, &[n, hq, hd])?;
                    cache.prefill_with_policy(li, &[l0.seq], &qv, &[0, n as i32], l0.policy, &mut ov, None, params)?;
                }
            }
            self.attention_secs += t0.elapsed().as_secs_f64();

            matmul(&att, n, &layer.wo, &mut proj);
            x.par_iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut xn);
            matmul(&xn, n, &layer.w_gate, &mut gate);
            matmul(&xn, n, &layer.w_up, &mut up);
            gate.par_iter_mut().zip(&up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            matmul(&gate, n, &layer.w_down, &mut proj);
            x.par_iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        if decode && layers == c.num_layers {
            for l in lanes {
                self.stats.entry(l.seq).or_default().decode_steps += 1;
            }
        }
        if layers < c.num_layers || step.logits == Logits::None {
            return Ok(out);
        }
        let out_rows: Vec<usize> = match step.logits {
            Logits::All => (0..n).collect(),
            _ => rows.iter().map(|r| r.first + r.rows - 1).collect(),
        };
        let mut h = vec![0f32; out_rows.len() * d];
        for (o, &r) in h.chunks_mut(d).zip(&out_rows) {
            o.copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        let mut hn = vec![0f32; h.len()];
        rms_norm(&h, &m.out_norm, c.rms_eps, &mut hn);
        out.logits = vec![0f32; out_rows.len() * c.vocab_size];
        matmul(&hn, out_rows.len(), m.lm_head(), &mut out.logits);
        Ok(out)
    }

    /// Count one layer of a decode step of `seq`: the K and V rows its selection read (all
    /// rows for a dense layer), plus the page key bounds that page-bound selection scanned,
    /// the f32 centroids that centroid retrieval scored and the keys `topk=` scored, against what dense attention
    /// reads; and its share of the attention time.
    fn count_decode(
        &mut self,
        cache: &KvCache,
        seq: SeqId,
        layer: usize,
        policy: &Policy,
        sel: Option<&PolicySelection>,
        secs: f64,
    ) -> Result<()> {
        let c = cache.config();
        let row = 2.0 * (c.head_dim * c.dtype.size()) as f64;
        let len = cache.seq_len(seq)?;
        let dense = (len * c.num_kv_heads) as f64 * row;
        let probe = self.probe.clone();
        let st = self.stats.entry(seq).or_default();
        if let Some(r) = probe {
            let r = r.start.min(len)..r.end.min(len);
            st.fact_tokens_total += r.len() * c.num_kv_heads;
            st.fact_tokens_read += match sel {
                None => r.len() * c.num_kv_heads,
                Some(p) => (0..c.num_kv_heads)
                    .map(|h| p.selection.head(h).iter().filter(|&&t| r.contains(&(t as usize))).count())
                    .sum(),
            };
        }
        st.decode_attention_secs += secs;
        st.decode_dense_kv_bytes += dense;
        match sel {
            None => st.decode_kv_bytes += dense,
            Some(p) => {
                let s = &p.selection;
                st.decode_kv_bytes += s.len() as f64 * row;
                st.decode_kv_bytes += ((p.centroids_scored * c.head_dim + p.radii_read) * 4) as f64;
                let paged =
                    (0..c.num_kv_heads).filter(|&h| policy.spec(layer, h).pages.is_some_and(|p| p < len)).count();
                st.decode_kv_bytes += (len.div_ceil(c.page_size) * paged) as f64 * row;
                // `topk=` scores every key outside its sinks and window: K rows only.
                let scanned: usize = (0..c.num_kv_heads)
                    .filter(|&h| policy.spec(layer, h).topk.is_some())
                    .map(|h| {
                        let sp = policy.spec(layer, h);
                        len.saturating_sub(sp.sinks.unwrap_or(0).saturating_add(sp.window.unwrap_or(0)))
                    })
                    .sum();
                st.decode_kv_bytes += scanned as f64 * row / 2.0;
                // `clusters=` with `span=` ranks its retrieved tokens by their keys: about
                // its budget of K rows (whole clusters can overshoot it slightly).
                let ranked: usize = (0..c.num_kv_heads)
                    .map(|h| policy.spec(layer, h))
                    .filter(|sp| sp.span.is_some())
                    .filter_map(|sp| sp.clusters)
                    .map(|b| b.min(len))
                    .sum();
                st.decode_kv_bytes += ranked as f64 * row / 2.0;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn write(
    cache: &mut KvCache,
    seq: SeqId,
    layer: usize,
    start: usize,
    k: &[f32],
    v: &[f32],
    hk: usize,
    hd: usize,
) -> Result<()> {
    let n = k.len() / (hk * hd);
    cache.write(seq, layer, start, &TensorView::new(k, &[n, hk, hd])?, &TensorView::new(v, &[n, hk, hd])?)?;
    Ok(())
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
