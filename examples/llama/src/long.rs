//! Past the training window: passkey retrieval in contexts longer than the model's 8K
//! training context, dense attention against LM-Infinite's Λ-mask and the Λ-mask plus
//! centroid retrieval.
//!
//! Per trial (a passkey at an evenly spread depth):
//! - `dense`: the context prefilled with every token at its real position, then the question
//!   and answer decoded densely;
//! - `lambda`: the context prefilled under the Λ-mask (`global=4,local=W,max_distance=M`,
//!   keys stored before RoPE, relative distances capped at M), then decoded under it;
//! - `lambda+clusters`: a fork of the same Λ-mask prefill whose decode also reads the best
//!   K-means clusters of each (layer, KV head) up to a token budget, scored at the capped
//!   distance (the index clusters the raw keys, built once after prefill).
//!
//! Reported per (length, policy, trial): whether the answer is right, prefill seconds
//! (index build included), attention ms and KV bytes read per decode step (selected rows
//! plus centroids scored), and the peak KV memory the sequence held.

use std::time::Instant;

use kvsieve::Policy;

use crate::engine::{argmax, Engine, Kv, Lane, Logits, Result, Side, Step};
use crate::generate::{prefill, prefill_chunked};
use crate::model::Model;
use crate::sweep::build_lane_clusters;
use crate::tasks::{self, Trial};
use crate::tokenizer::Tokenizer;

/// Tokens per Λ-mask prefill call: each call reads the sinks, the window and the chunk.
pub const LAMBDA_PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct LongConfig {
    pub lengths: Vec<usize>,
    pub trials: usize,
    /// The Λ-mask's local window and distance cap.
    pub local: usize,
    pub max_distance: usize,
    /// Centroid retrieval budget (tokens per KV head) and fine clusters per head.
    pub clusters: usize,
    pub clusters_k: usize,
    /// Replaces the retrieval lane's policy text (it must store keys before RoPE: a
    /// position mode other than original).
    pub retrieval_policy: Option<String>,
    /// Run dense attention too (its prefill is quadratic in the length).
    pub dense: bool,
    pub page_size: usize,
    pub seed: u64,
}

impl LongConfig {
    pub fn lambda_text(&self) -> String {
        format!("global=4,local={},max_distance={}", self.local, self.max_distance)
    }
    pub fn clusters_text(&self) -> String {
        if let Some(t) = &self.retrieval_policy {
            return t.clone();
        }
        format!("{},clusters={},clusters_k={}", self.lambda_text(), self.clusters, self.clusters_k)
    }
}

/// One (length, policy, trial) result.
#[derive(Debug, Clone)]
pub struct LongRow {
    pub length: usize,
    pub policy: String,
    pub policy_text: String,
    pub trial: usize,
    pub depth: f64,
    pub answer: String,
    pub generated: String,
    pub correct: bool,
    pub prefill_secs: f64,
    pub attention_ms_per_step: f64,
    pub kv_bytes_per_step: f64,
    pub peak_kv_mb: f64,
}

/// Decode `trial`'s question and answer for several lanes at once; returns per lane the
/// generated text and the peak pages its sequence held.
fn decode_lanes(
    engine: &mut Engine,
    kv: &mut Kv,
    lanes: &[Lane],
    trial: &Trial,
    tok: &Tokenizer,
    vocab: usize,
) -> Result<Vec<(String, usize)>> {
    let n = lanes.len();
    let mut peaks = vec![0usize; n];
    let observe = |kv: &Kv, peaks: &mut [usize]| -> Result<()> {
        for (l, p) in lanes.iter().zip(peaks.iter_mut()) {
            *p = (*p).max(kv.cache(l.side).seq_pages(l.seq)?.len());
        }
        Ok(())
    };
    observe(kv, &mut peaks)?;
    let mut logits = Vec::new();
    for (i, &t) in trial.question.iter().enumerate() {
        let last = i + 1 == trial.question.len();
        let step = Step { logits: if last { Logits::Last } else { Logits::None }, ..Step::default() };
        logits = engine.forward(kv, lanes, &vec![t; n], &step)?.logits;
        observe(kv, &mut peaks)?;
    }
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    for step in 0..trial.answer_tokens {
        let next: Vec<u32> = logits.chunks(vocab).map(argmax).collect();
        for (g, &t) in generated.iter_mut().zip(&next) {
            g.push(t);
        }
        if step + 1 < trial.answer_tokens {
            logits = engine.forward(kv, lanes, &next, &Step::default())?.logits;
            observe(kv, &mut peaks)?;
        }
    }
    Ok(generated.iter().map(|g| tok.decode(g)).zip(peaks).collect())
}

#[allow(clippy::too_many_arguments)]
fn row(
    cfg_len: usize,
    name: &str,
    text: &str,
    i: usize,
    trial: &Trial,
    generated: &str,
    prefill_secs: f64,
    engine: &Engine,
    lane: &Lane,
    kv: &Kv,
    peak_pages: usize,
) -> LongRow {
    let st = engine.stats.get(&lane.seq).copied().unwrap_or_default();
    let page = kv.cache(lane.side).stats().bytes_per_page;
    LongRow {
        length: cfg_len,
        policy: name.into(),
        policy_text: text.into(),
        trial: i,
        depth: trial.depth,
        answer: trial.answer.clone(),
        generated: generated.trim().to_string(),
        correct: trial.is_correct(generated),
        prefill_secs,
        attention_ms_per_step: st.attention_secs_per_step() * 1e3,
        kv_bytes_per_step: st.kv_bytes_per_step(),
        peak_kv_mb: (peak_pages * page) as f64 / 1e6,
    }
}

/// Run every trial; `progress` prints a line per finished run.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    cfg: &LongConfig,
    progress: &mut dyn FnMut(&LongRow),
) -> Result<Vec<LongRow>> {
    let layers = model.cfg.num_layers;
    let hk = model.cfg.num_kv_heads;
    let vocab = model.cfg.vocab_size;
    let ps = cfg.page_size;
    let lambda = Policy::parse(&cfg.lambda_text())?;
    let clusters = Policy::parse(&cfg.clusters_text())?;
    let dense = Policy::dense();
    let mut rows = Vec::new();
    for &length in &cfg.lengths {
        for i in 0..cfg.trials {
            let seed = cfg.seed.wrapping_add(31_000_000 + 1000 * length as u64 + i as u64);
            let trial = tasks::passkey(tok, length, tasks::depth(i, cfg.trials), seed);
            let extra = trial.question.len() + trial.answer_tokens;
            let total = trial.context.len() + extra;

            // Λ-mask and Λ-mask + retrieval: one prefill, two forks.
            {
                let mut kv = Kv::new(model, total, ps, 2 * (extra.div_ceil(ps) + 2), true)?;
                let base = kv.create();
                let mut engine = Engine::new(model);
                let t0 = Instant::now();
                prefill_chunked(
                    &mut engine,
                    &mut kv,
                    &Lane::new(base, &lambda, layers),
                    &trial.context,
                    &Step { logits: Logits::None, ..Step::default() },
                    LAMBDA_PREFILL_CHUNK,
                )?;
                let prefill_secs = t0.elapsed().as_secs_f64();
                let a = kv.fork(base)?;
                let b = kv.fork(base)?;
                kv.free(base)?;
                let lanes = [Lane::new(a, &lambda, layers), Lane::new(b, &clusters, layers)];
                debug_assert!(lanes.iter().all(|l| l.side == Side::Pre));
                let index_secs = build_lane_clusters(&mut engine, &kv, &lanes, layers, hk)?;
                let out = decode_lanes(&mut engine, &mut kv, &lanes, &trial, tok, vocab)?;
                for (j, (name, text)) in
                    [("lambda", cfg.lambda_text()), ("lambda+clusters", cfg.clusters_text())].into_iter().enumerate()
                {
                    let r = row(
                        length,
                        name,
                        &text,
                        i,
                        &trial,
                        &out[j].0,
                        prefill_secs + index_secs[j],
                        &engine,
                        &lanes[j],
                        &kv,
                        out[j].1,
                    );
                    progress(&r);
                    rows.push(r);
                }
            }

            if cfg.dense {
                let mut kv = Kv::new(model, total, ps, 2, false)?;
                let seq = kv.create();
                let mut engine = Engine::new(model);
                let lane = Lane::new(seq, &dense, layers);
                let t0 = Instant::now();
                prefill(
                    &mut engine,
                    &mut kv,
                    &lane,
                    &trial.context,
                    &Step { logits: Logits::None, ..Step::default() },
                )?;
                let prefill_secs = t0.elapsed().as_secs_f64();
                let out = decode_lanes(&mut engine, &mut kv, &[lane], &trial, tok, vocab)?;
                let r =
                    row(length, "dense", "dense", i, &trial, &out[0].0, prefill_secs, &engine, &lane, &kv, out[0].1);
                progress(&r);
                rows.push(r);
            }
        }
    }
    Ok(rows)
}

pub fn write_csv(rows: &[LongRow], path: &std::path::Path) -> std::io::Result<()> {
    let mut s = String::from("length,policy,trial,depth,answer,generated,correct,prefill_s,attention_ms_per_step,kv_bytes_per_step,peak_kv_mb,policy_text\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.3},{},\"{}\",{},{:.2},{:.3},{:.0},{:.1},\"{}\"\n",
            r.length,
            r.policy,
            r.trial,
            r.depth,
            r.answer,
            r.generated.replace('"', "'").replace('\n', " "),
            r.correct,
            r.prefill_secs,
            r.attention_ms_per_step,
            r.kv_bytes_per_step,
            r.peak_kv_mb,
            r.policy_text
        ));
    }
    std::fs::write(path, s)
}

/// Accuracy and means per (length, policy).
pub fn summary(rows: &[LongRow]) -> String {
    let mut keys: Vec<(usize, String)> = rows.iter().map(|r| (r.length, r.policy.clone())).collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    let mut s = format!(
        "{:>7} {:<16} {:>8} {:>10} {:>12} {:>10} {:>9}\n",
        "length", "policy", "passkey", "prefill s", "KV KB/step", "attn ms", "peak MB"
    );
    for (len, p) in keys {
        let rs: Vec<&LongRow> = rows.iter().filter(|r| r.length == len && r.policy == p).collect();
        let n = rs.len() as f64;
        let mean = |f: &dyn Fn(&LongRow) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
        s.push_str(&format!(
            "{:>7} {:<16} {:>8} {:>10.1} {:>12.0} {:>10.2} {:>9.1}\n",
            len,
            p,
            format!("{}/{}", rs.iter().filter(|r| r.correct).count(), rs.len()),
            mean(&|r| r.prefill_secs),
            mean(&|r| r.kv_bytes_per_step) / 1024.0,
            mean(&|r| r.attention_ms_per_step),
            mean(&|r| r.peak_kv_mb),
        ));
    }
    s
}
