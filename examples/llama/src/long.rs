//! Past the training window: retrieval tasks and perplexity in contexts longer than the
//! model's 8K training context, dense attention against sparse policies.
//!
//! Per (length, task, trial) every policy gets the same prompt: the context is prefilled
//! under the policy's *prefill form* (the policy without the items that choose tokens per
//! decode query from an index or page bounds, `clusters=` and `pages=`: those join at
//! decode), in chunks of [`LONG_PREFILL_CHUNK`] tokens; policies with equal prefill forms
//! share one prefill (kvsieve forks, copy on write). Then the question and the answer are
//! decoded under each full policy. Policies that renumber or cap positions store keys
//! before RoPE; `positions=contiguous` prefill reads, per chunk, the sinks, the retrieved
//! spans and the window (kvsieve's prefill rule), so its attention work is linear in the length.
//!
//! Reported per (length, task, policy, trial): whether the answer is right, prefill seconds
//! (index build included), attention ms and KV bytes read per decode step (selected rows,
//! plus centroids scored and keys scanned by `topk=`), and the peak KV memory held.
//!
//! [`perplexity`] measures each policy's perplexity over a long KJV text per 1K-token
//! bucket of position: the text is prefilled under the policy's prefill form with every
//! row's logits kept.

use std::collections::BTreeMap;
use std::time::Instant;

use kvsieve::select::{LayerOverride, Spec};
use kvsieve::Policy;

use crate::engine::{argmax, log_prob, side_for, Engine, Kv, Lane, Logits, Result, Side, Step};
use crate::generate::prefill_chunked;
use crate::model::Model;
use crate::sweep::build_lane_clusters;
use crate::tasks::{self, Task, Trial};
use crate::tokenizer::Tokenizer;

/// Tokens per prefill call: a windowed or span policy's chunk reads its sinks, its window,
/// what it retrieves and the chunk.
pub const LONG_PREFILL_CHUNK: usize = 512;

/// The default policies of `long`: dense (real positions), LM-Infinite's Λ-mask, and
/// centroid retrieval grown into spans with contiguous positions (ReAttention's rule),
/// each reading at most 4K tokens per KV head at decode (dense excepted).
pub fn default_policies() -> Vec<(String, String)> {
    vec![
        ("dense".into(), "dense".into()),
        ("lambda".into(), "global=4,local=1024,max_distance=4096".into()),
        (
            "cspans".into(),
            "sinks=64,window=256,clusters=512,cluster_size=32,rank=mixed,span=32,positions=contiguous".into(),
        ),
    ]
}

#[derive(Debug, Clone)]
pub struct LongConfig {
    pub lengths: Vec<usize>,
    pub trials: usize,
    pub tasks: Vec<Task>,
    /// (name, policy text), in report order.
    pub policies: Vec<(String, String)>,
    pub page_size: usize,
    pub seed: u64,
}

/// One (length, task, policy, trial) result.
#[derive(Debug, Clone)]
pub struct LongRow {
    pub length: usize,
    pub task: Task,
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
    /// Share of the planted fact's tokens that the decode selections held.
    pub fact_recall: f64,
}

/// A policy text with `{prefix}` replaced by the trial's opening length in tokens (the
/// chat template and the instruction): an engine that knows where the user's instruction
/// ends protects it by making that many tokens sinks.
pub fn with_prefix(text: &str, prefix: usize) -> String {
    text.replace("{prefix}", &prefix.max(1).to_string())
}

fn reduce(spec: &Spec) -> Spec {
    let mut s = Spec {
        clusters: None,
        clusters_k: None,
        cluster_size: None,
        hier: None,
        rank: None,
        pages: None,
        min_pages: None,
        ..spec.clone()
    };
    if s.topk.is_none() {
        s.span = None;
    }
    if s.is_empty() {
        s = Spec { dense: true, positions: s.positions, max_distance: s.max_distance, ..Spec::default() };
    }
    s
}

/// The policy a context is prefilled under before `policy` decodes (see the module docs).
pub fn prefill_form(policy: &Policy) -> Policy {
    let mut p = Policy::new(reduce(policy.default_spec()));
    for o in policy.layer_overrides() {
        let LayerOverride { layers, spec } = o;
        p = p.with_layers(layers.iter().copied(), reduce(spec));
    }
    for o in policy.head_overrides() {
        p = p.with_heads(o.heads.iter().copied(), reduce(&o.spec));
    }
    p
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

/// Policies grouped by prefill form: (prefill form, indices into `policies`).
fn prefill_groups(policies: &[Policy]) -> Vec<(Policy, Vec<usize>)> {
    let mut groups: Vec<(Policy, Vec<usize>)> = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let form = prefill_form(p);
        match groups.iter_mut().find(|(f, _)| *f == form) {
            Some((_, v)) => v.push(i),
            None => groups.push((form, vec![i])),
        }
    }
    groups
}

/// Run every trial; `progress` prints a line per finished run.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    kjv: &str,
    cfg: &LongConfig,
    progress: &mut dyn FnMut(&LongRow),
) -> Result<Vec<LongRow>> {
    let layers = model.cfg.num_layers;
    let hk = model.cfg.num_kv_heads;
    let vocab = model.cfg.vocab_size;
    let ps = cfg.page_size;
    // Check every text once up front (with a stand-in for `{prefix}`).
    for (_, t) in &cfg.policies {
        Policy::parse(&with_prefix(t, 1))?.validate(layers, hk)?;
    }
    let mut rows = Vec::new();
    for &length in &cfg.lengths {
        for &task in &cfg.tasks {
            for i in 0..cfg.trials {
                let seed = cfg.seed.wrapping_add(31_000_000 + 1000 * length as u64 + i as u64);
                let trial = task.trial(tok, kjv, length, tasks::depth(i, cfg.trials), seed);
                let texts: Vec<String> = cfg.policies.iter().map(|(_, t)| with_prefix(t, trial.prefix)).collect();
                let policies: Vec<Policy> = texts.iter().map(|t| Policy::parse(t)).collect::<kvsieve::Result<_>>()?;
                let groups = prefill_groups(&policies);
                let extra = trial.question.len() + trial.answer_tokens;
                let total = trial.context.len() + extra;
                for (form, members) in &groups {
                    let side = side_for(form, layers);
                    let n = members.len();
                    let mut kv = Kv::new(model, total, ps, n * (extra.div_ceil(ps) + 2), side == Side::Pre)?;
                    let base = kv.create();
                    let mut engine = Engine::new(model);
                    engine.probe = Some(trial.needle.clone());
                    let t0 = Instant::now();
                    prefill_chunked(
                        &mut engine,
                        &mut kv,
                        &Lane { seq: base, side, policy: form },
                        &trial.context,
                        &Step { logits: Logits::None, ..Step::default() },
                        LONG_PREFILL_CHUNK,
                    )?;
                    let prefill_secs = t0.elapsed().as_secs_f64();
                    let seqs: Vec<_> = if n == 1 {
                        vec![base]
                    } else {
                        let s = (0..n).map(|_| kv.fork(base)).collect::<Result<Vec<_>>>()?;
                        kv.free(base)?;
                        s
                    };
                    let lanes: Vec<Lane> =
                        members.iter().zip(&seqs).map(|(&m, &seq)| Lane { seq, side, policy: &policies[m] }).collect();
                    let index_secs = build_lane_clusters(&mut engine, &kv, &lanes, layers, hk)?;
                    let out = decode_lanes(&mut engine, &mut kv, &lanes, &trial, tok, vocab)?;
                    for (j, &m) in members.iter().enumerate() {
                        let st = engine.stats.get(&lanes[j].seq).copied().unwrap_or_default();
                        let page = kv.cache(side).stats().bytes_per_page;
                        let r = LongRow {
                            length,
                            task,
                            policy: cfg.policies[m].0.clone(),
                            policy_text: texts[m].clone(),
                            trial: i,
                            depth: trial.depth,
                            answer: trial.answer.clone(),
                            generated: out[j].0.trim().to_string(),
                            correct: trial.is_correct(&out[j].0),
                            prefill_secs: prefill_secs + index_secs[j],
                            attention_ms_per_step: st.attention_secs_per_step() * 1e3,
                            kv_bytes_per_step: st.kv_bytes_per_step(),
                            peak_kv_mb: (out[j].1 * page) as f64 / 1e6,
                            fact_recall: st.fact_recall(),
                        };
                        progress(&r);
                        rows.push(r);
                    }
                }
            }
        }
    }
    // Report order: length, task, then the configured policy order, then trial.
    let order = |r: &LongRow| cfg.policies.iter().position(|(n, _)| *n == r.policy).unwrap_or(usize::MAX);
    rows.sort_by_key(|r| (r.length, r.task, order(r), r.trial));
    Ok(rows)
}

pub fn write_csv(rows: &[LongRow], path: &std::path::Path) -> std::io::Result<()> {
    let mut s = String::from("length,task,policy,trial,depth,answer,generated,correct,prefill_s,attention_ms_per_step,kv_bytes_per_step,peak_kv_mb,fact_recall,policy_text\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{:.3},{},\"{}\",{},{:.2},{:.3},{:.0},{:.1},{:.4},\"{}\"\n",
            r.length,
            r.task.name(),
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
            r.fact_recall,
            r.policy_text
        ));
    }
    std::fs::write(path, s)
}

/// Accuracy and means per (length, task, policy).
pub fn summary(rows: &[LongRow]) -> String {
    let mut keys: Vec<(usize, Task, String)> = Vec::new();
    for r in rows {
        let k = (r.length, r.task, r.policy.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut s = format!(
        "{:>7} {:<17} {:<10} {:>8} {:>10} {:>12} {:>10} {:>9} {:>7}\n",
        "length", "task", "policy", "correct", "prefill s", "KV KB/step", "attn ms", "peak MB", "recall"
    );
    for (len, task, p) in keys {
        let rs: Vec<&LongRow> = rows.iter().filter(|r| r.length == len && r.task == task && r.policy == p).collect();
        let n = rs.len() as f64;
        let mean = |f: &dyn Fn(&LongRow) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
        s.push_str(&format!(
            "{:>7} {:<17} {:<10} {:>8} {:>10.1} {:>12.0} {:>10.2} {:>9.1} {:>7.3}\n",
            len,
            task.name(),
            p,
            format!("{}/{}", rs.iter().filter(|r| r.correct).count(), rs.len()),
            mean(&|r| r.prefill_secs),
            mean(&|r| r.kv_bytes_per_step) / 1024.0,
            mean(&|r| r.attention_ms_per_step),
            mean(&|r| r.peak_kv_mb),
            mean(&|r| r.fact_recall),
        ));
    }
    s
}

/// Perplexity per bucket of `bucket` positions of `tokens` (the first token is not
/// predicted) under each policy's prefill form; returns per policy name the perplexity of
/// each bucket, in order, and the prefill seconds.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    policies: &[(String, String)],
    bucket: usize,
    page_size: usize,
    progress: &mut dyn FnMut(&str, usize, f64),
) -> Result<BTreeMap<String, (Vec<f64>, f64)>> {
    let layers = model.cfg.num_layers;
    let v = model.cfg.vocab_size;
    let mut out = BTreeMap::new();
    for (name, text) in policies {
        // A plain text has no instruction: `{prefix}` becomes StreamingLLM's 4 sinks.
        let form = prefill_form(&Policy::parse(&with_prefix(text, 4))?);
        form.validate(layers, model.cfg.num_kv_heads)?;
        let side = side_for(&form, layers);
        let mut kv = Kv::new(model, tokens.len(), page_size, 2, side == Side::Pre)?;
        let seq = kv.create();
        let mut engine = Engine::new(model);
        let lane = Lane { seq, side, policy: &form };
        let step = Step { logits: Logits::All, ..Step::default() };
        let nb = tokens.len().div_ceil(bucket);
        let (mut nll, mut count) = (vec![0f64; nb], vec![0usize; nb]);
        let t0 = Instant::now();
        for (ci, chunk) in tokens.chunks(LONG_PREFILL_CHUNK).enumerate() {
            let logits = engine.forward(&mut kv, &[lane], chunk, &step)?.logits;
            for (i, row) in logits.chunks(v).enumerate() {
                let next = ci * LONG_PREFILL_CHUNK + i + 1;
                if next < tokens.len() {
                    nll[next / bucket] -= log_prob(row, tokens[next]);
                    count[next / bucket] += 1;
                }
            }
            let done = (ci + 1) * LONG_PREFILL_CHUNK;
            if done.is_multiple_of(4 * bucket) {
                let b = done / bucket - 1;
                progress(name, done, (nll[b] / count[b].max(1) as f64).exp());
            }
        }
        let ppl = nll.iter().zip(&count).map(|(l, &c)| (l / c.max(1) as f64).exp()).collect();
        out.insert(name.clone(), (ppl, t0.elapsed().as_secs_f64()));
    }
    Ok(out)
}

/// Perplexity per bucket as CSV: `policy,bucket_start,bucket_end,ppl`.
pub fn write_ppl_csv(
    ppl: &BTreeMap<String, (Vec<f64>, f64)>,
    bucket: usize,
    path: &std::path::Path,
) -> std::io::Result<()> {
    let mut s = String::from("policy,bucket_start,bucket_end,ppl\n");
    for (name, (v, _)) in ppl {
        for (i, p) in v.iter().enumerate() {
            s.push_str(&format!("{name},{},{},{p:.4}\n", i * bucket, (i + 1) * bucket));
        }
    }
    std::fs::write(path, s)
}

/// Read perplexity rows written by [`write_ppl_csv`] (several files may be merged; a policy
/// in two files keeps the later one).
pub fn read_ppl_csv(path: &std::path::Path, into: &mut BTreeMap<String, (Vec<f64>, f64)>) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut fresh: BTreeMap<String, (Vec<f64>, f64)> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 4 {
            return Err(format!("{}: expected policy,bucket_start,bucket_end,ppl, got {line:?}", path.display()).into());
        }
        fresh.entry(f[0].to_string()).or_default().0.push(f[3].parse()?);
    }
    into.extend(fresh);
    Ok(())
}

/// Perplexity against position, one line per policy, as an SVG (log-scale y).
pub fn ppl_svg(ppl: &BTreeMap<String, (Vec<f64>, f64)>, bucket: usize, training: usize) -> String {
    let (w, h, l, r, t, b) = (720.0, 420.0, 60.0, 150.0, 30.0, 50.0);
    let n = ppl.values().map(|(v, _)| v.len()).max().unwrap_or(1).max(1);
    let all: Vec<f64> = ppl.values().flat_map(|(v, _)| v.iter().copied()).filter(|x| x.is_finite()).collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).max(1.0).ln();
    let hi = all.iter().cloned().fold(0.0, f64::max).max(2.0).ln();
    let (lo, hi) = if hi - lo < 0.1 { (lo - 0.05, hi + 0.05) } else { (lo, hi) };
    let x = |i: f64| l + (w - l - r) * i / n as f64;
    let y = |p: f64| t + (h - t - b) * (1.0 - (p.max(1e-9).ln() - lo) / (hi - lo));
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s.push_str(&format!(
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\">KJV perplexity per {bucket}-token bucket (log scale)</text>\n",
        (w - r + l) / 2.0
    ));
    s.push_str(&format!("<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", h - b, w - r, h - b));
    s.push_str(&format!("<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n", h - b));
    let tx = x(training as f64 / bucket as f64);
    s.push_str(&format!(
        "<line x1=\"{tx}\" y1=\"{t}\" x2=\"{tx}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{}\" fill=\"#666\">training context</text>\n",
        h - b,
        tx + 4.0,
        t + 12.0
    ));
    let step = (n / 8).max(1);
    for i in (0..=n).step_by(step) {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}K</text>\n",
            x(i as f64),
            h - b + 18.0,
            i * bucket / 1024
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">position (tokens)</text>\n",
        (w - r + l) / 2.0,
        h - 10.0
    ));
    for k in 0..=4 {
        let p = (lo + (hi - lo) * k as f64 / 4.0).exp();
        s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{p:.1}</text>\n", l - 6.0, y(p) + 4.0));
    }
    for (ci, (name, (v, _))) in ppl.iter().enumerate() {
        let c = colors[ci % colors.len()];
        let pts: Vec<String> =
            v.iter().enumerate().map(|(i, &p)| format!("{:.1},{:.1}", x(i as f64 + 0.5), y(p))).collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>\n",
            w - r + 8.0,
            t + 16.0 * (ci as f64 + 1.0)
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_form_drops_decode_only_items() {
        let p = Policy::parse(
            "sinks=4,window=64,clusters=512,cluster_size=32,rank=mixed,positions=contiguous;layers=0:dense",
        )
        .unwrap();
        assert_eq!(prefill_form(&p).to_string(), "sinks=4,window=64,positions=contiguous;layers=0:dense");
        let p = Policy::parse("sinks=4,window=64,topk=512,span=32,positions=contiguous").unwrap();
        assert_eq!(prefill_form(&p), p);
        let p = Policy::parse("pages=64,span=16").unwrap();
        assert_eq!(prefill_form(&p).to_string(), "dense");
        let groups = prefill_groups(&[
            Policy::parse("global=4,local=64,max_distance=128").unwrap(),
            Policy::parse("global=4,local=64,max_distance=128,clusters=32").unwrap(),
            Policy::dense(),
        ]);
        assert_eq!(groups.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), vec![vec![0, 1], vec![2]]);
    }
}
