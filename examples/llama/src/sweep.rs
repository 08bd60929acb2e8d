//! The policy sweep: for each context length, each policy at each KV budget, passkey and
//! needle accuracy, perplexity change, KV bytes read and attention time per decode step,
//! prefill time and KV memory.
//!
//! Per trial the context is prefilled once, densely (into both caches when some policy
//! needs keys stored before RoPE); then every (policy, budget) gets a fork of it (kvsieve
//! prefix sharing) and all forks decode the question and the answer together, one batched
//! step per token, each attending through its own policy. GemFilter is a prompt filter, not
//! a decode policy, so it runs its own pipeline: the first layers over the whole prompt,
//! selection at the calibrated layer, a re-prefill of the kept tokens, then dense decoding.

use std::collections::BTreeMap;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kvsieve::select::gemfilter::{self, GemFilterConfig, KeySource};
use kvsieve::{Policy, TensorView};

use crate::engine::{argmax, log_prob, side_for, Engine, Kv, Lane, Logits, Result, Side, Step};
use crate::generate::prefill;
use crate::model::Model;
use crate::tasks::{self, Task, Trial};
use crate::tokenizer::Tokenizer;

/// A policy of the sweep: a name and kvsieve's policy text, where `{budget}` stands for the
/// KV budget in tokens and `{budget-N}` for the budget less `N`.
#[derive(Debug, Clone)]
pub struct PolicyDef {
    pub name: String,
    pub template: String,
}

impl PolicyDef {
    pub fn new(name: &str, template: &str) -> Self {
        PolicyDef { name: name.into(), template: template.into() }
    }

    /// The policy text for a budget, or `None` when the budget is too small for it.
    pub fn text(&self, budget: usize) -> Option<String> {
        let mut out = String::new();
        let mut rest = self.template.as_str();
        while let Some(p) = rest.find("{budget") {
            out.push_str(&rest[..p]);
            let end = p + rest[p..].find('}')?;
            let inner = &rest[p + "{budget".len()..end];
            let value = match inner.strip_prefix('-') {
                Some(n) => budget.checked_sub(n.trim().parse().ok()?).filter(|&v| v > 0)?,
                None if inner.is_empty() => budget,
                None => return None,
            };
            out.push_str(&value.to_string());
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        Some(out)
    }
}

/// The policies swept by default (GemFilter is added by [`SweepConfig::gemfilter`]).
/// More plug in with `--policy NAME=TEXT`.
pub fn default_policies() -> Vec<PolicyDef> {
    vec![
        PolicyDef::new("sinks+window", "sinks=4,window={budget-4},positions=contiguous"),
        PolicyDef::new("lambda", "global=4,local={budget-4},max_distance={budget}"),
        PolicyDef::new("page-bounds", "sinks=4,window=64,pages={budget-68}"),
        PolicyDef::new("clusters-est", "sinks=4,window=64,clusters={budget-68},cluster_size=32"),
        PolicyDef::new("clusters", "sinks=4,window=64,clusters={budget-68},cluster_size=32,rank=mixed"),
        PolicyDef::new("clusters-hier", "sinks=4,window=64,clusters={budget-68},cluster_size=32,hier=16,rank=mixed"),
    ]
}

/// Build the cluster indexes of the lanes whose policy uses `clusters=`: once per distinct
/// index (same layers, options, window and cache side), copied to the other lanes that
/// need the same one (forks of one context hold the same keys). Returns per lane the
/// seconds its index took to build (0 without `clusters=`).
pub fn build_lane_clusters(
    engine: &mut Engine,
    kv: &Kv,
    lanes: &[Lane],
    num_layers: usize,
    num_kv_heads: usize,
) -> Result<Vec<f64>> {
    let mut built: Vec<(String, u64, f64)> = Vec::new();
    let mut secs = vec![0.0; lanes.len()];
    for (i, l) in lanes.iter().enumerate() {
        let plan: Vec<_> = (0..num_layers).map(|layer| l.policy.cluster_plan(layer, num_kv_heads)).collect();
        if plan.iter().all(Option::is_none) {
            continue;
        }
        let key = format!("{:?} {:?}", l.side, plan);
        secs[i] = match built.iter().find(|b| b.0 == key) {
            Some(&(_, from, s)) => {
                engine.copy_clusters(from, l.seq, num_layers);
                s
            }
            None => {
                let s = engine.build_clusters(kv, l)?;
                built.push((key, l.seq, s));
                s
            }
        };
    }
    Ok(secs)
}

/// Pages each lane's sequence holds now, folded into the peaks seen so far.
fn observe_peaks(kv: &Kv, lanes: &[Lane], peaks: &mut [usize]) -> Result<()> {
    for (l, p) in lanes.iter().zip(peaks.iter_mut()) {
        *p = (*p).max(kv.cache(l.side).seq_pages(l.seq)?.len());
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub contexts: Vec<usize>,
    /// Budgets as fractions of the context.
    pub budgets: Vec<f64>,
    pub policies: Vec<PolicyDef>,
    pub gemfilter: bool,
    /// GemFilter's filter layer; `None`: calibrate.
    pub gemfilter_layer: Option<usize>,
    pub passkey_trials: usize,
    pub needle_trials: usize,
    /// Trials of each chat-template task on natural text (passkey in KJV verses, needle in
    /// the KJV), per context.
    pub chat_trials: usize,
    /// Perplexity windows per context, and the tokens evaluated at the end of each.
    pub ppl_windows: usize,
    pub ppl_eval_tokens: usize,
    pub page_size: usize,
    pub seed: u64,
}

/// Aggregated figures of one (context, policy, budget).
#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub policy_text: String,
    pub budget_tokens: usize,
    pub correct: BTreeMap<&'static str, (usize, usize)>,
    pub nll: f64,
    pub nll_count: usize,
    pub decode_steps: usize,
    pub kv_bytes: f64,
    pub dense_kv_bytes: f64,
    pub attention_secs: f64,
    pub prefill_secs: f64,
    pub prefills: usize,
    pub kv_bytes_held: f64,
    /// Sum over runs of the most KV bytes the run's sequence held at once.
    pub kv_bytes_peak: f64,
    pub kv_samples: usize,
}

impl Cell {
    pub fn accuracy(&self, task: Task) -> Option<f64> {
        self.correct.get(task.name()).filter(|c| c.1 > 0).map(|&(ok, n)| ok as f64 / n as f64)
    }
    pub fn perplexity(&self) -> Option<f64> {
        (self.nll_count > 0).then(|| (self.nll / self.nll_count as f64).exp())
    }
}

/// Key of a cell: (context, policy name, budget fraction in 1/65536 units; dense: 65536).
pub type CellKey = (usize, String, u32);

pub fn frac_key(f: f64) -> u32 {
    (f * 65536.0).round() as u32
}

/// One retrieval trial under one policy: what it had to answer and what it generated.
#[derive(Debug, Clone)]
pub struct TrialRecord {
    pub key: CellKey,
    pub task: &'static str,
    pub depth: f64,
    pub answer: String,
    pub generated: String,
    pub correct: bool,
}

pub struct SweepResult {
    pub cells: BTreeMap<CellKey, Cell>,
    /// Every retrieval trial of every lane, in run order.
    pub trials: Vec<TrialRecord>,
    /// GemFilter's filter layer and the recall per layer that chose it.
    pub gemfilter_layer: Option<(usize, Vec<f64>)>,
}

/// A decode lane of the sweep: a fork of the context under one policy.
struct LaneDef {
    key: CellKey,
    policy: Policy,
    text: String,
    budget: usize,
}

fn lane_defs(cfg: &SweepConfig, context: usize, num_layers: usize, num_kv_heads: usize) -> Result<Vec<LaneDef>> {
    let mut defs = vec![LaneDef {
        key: (context, "dense".into(), frac_key(1.0)),
        policy: Policy::dense(),
        text: "dense".into(),
        budget: context,
    }];
    for p in &cfg.policies {
        for &f in &cfg.budgets {
            let budget = ((context as f64) * f).round() as usize;
            let Some(text) = p.text(budget) else { continue };
            let policy = Policy::parse(&text).map_err(|e| format!("policy {} ({text}): {e}", p.name))?;
            policy.validate(num_layers, num_kv_heads).map_err(|e| format!("policy {} ({text}): {e}", p.name))?;
            defs.push(LaneDef { key: (context, p.name.clone(), frac_key(f)), policy, text, budget });
        }
    }
    Ok(defs)
}

pub struct Sweep<'a> {
    pub model: &'a Model,
    pub tok: &'a Tokenizer,
    pub kjv: &'a str,
    pub cfg: SweepConfig,
    pub cells: BTreeMap<CellKey, Cell>,
    pub trials: Vec<TrialRecord>,
}

impl<'a> Sweep<'a> {
    fn cell(&mut self, key: &CellKey, text: &str, budget: usize) -> &mut Cell {
        let c = self.cells.entry(key.clone()).or_default();
        c.policy_text = text.to_string();
        c.budget_tokens = budget;
        c
    }

    /// Pick GemFilter's layer: per layer, the share of the planted fact's tokens that the
    /// filter keeps at 1/8 of the context, averaged over passkey and needle prompts at two
    /// depths; the earliest layer within 0.05 of the best.
    pub fn calibrate_gemfilter(&self, context: usize) -> Result<(usize, Vec<f64>)> {
        let m = self.model;
        let layers = m.cfg.num_layers;
        let mut sum = vec![0f64; layers];
        let mut prompts = 0;
        for (i, depth) in [0.3, 0.7].into_iter().enumerate() {
            let seed = self.cfg.seed ^ 0xca11_b000 ^ i as u64;
            for trial in [
                tasks::passkey(self.tok, context, depth, seed),
                tasks::needle(self.tok, self.kjv, context, depth, seed),
            ] {
                let prompt: Vec<u32> = trial.context.iter().chain(&trial.question).copied().collect();
                let mut kv = Kv::new(m, prompt.len(), self.cfg.page_size, 1, false)?;
                let seq = kv.create();
                let mut engine = Engine::new(m);
                let dense = Policy::dense();
                let lane = Lane::new(seq, &dense, layers);
                let out = prefill(
                    &mut engine,
                    &mut kv,
                    &lane,
                    &prompt,
                    &Step { capture_queries: true, logits: Logits::None, ..Step::default() },
                )?;
                let gcfg = filter_config(prompt.len() / 8, trial.question.len());
                let (hq, hd) = (m.cfg.num_heads, m.cfg.head_dim);
                let recalls = gemfilter::calibrate_layers(layers, trial.needle.clone(), &gcfg, &mut |l| {
                    Ok((
                        TensorView::new(&out.queries[l], &[hq, hd])?,
                        KeySource::Cache { cache: &kv.post, seq, layer: l },
                    ))
                })?;
                for r in recalls {
                    sum[r.layer] += r.recall;
                }
                prompts += 1;
            }
        }
        let recall: Vec<f64> = sum.iter().map(|s| s / prompts as f64).collect();
        let best = recall.iter().cloned().fold(0.0, f64::max);
        let layer = recall.iter().position(|&r| r >= best - 0.05).unwrap_or(0);
        Ok((layer, recall))
    }

    pub fn run(mut self, progress: bool) -> Result<SweepResult> {
        let m = self.model;
        let (layers, hk) = (m.cfg.num_layers, m.cfg.num_kv_heads);
        let per_context =
            self.cfg.passkey_trials + self.cfg.needle_trials + 2 * self.cfg.chat_trials + self.cfg.ppl_windows;
        let bar = if progress {
            ProgressBar::new((per_context * self.cfg.contexts.len()) as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        let mut gem_layer = None;
        if self.cfg.gemfilter {
            let layer = match self.cfg.gemfilter_layer {
                Some(l) => (l, Vec::new()),
                None => {
                    bar.set_message("calibrating GemFilter's layer");
                    self.calibrate_gemfilter(self.cfg.contexts.iter().copied().min().unwrap_or(2048).min(2048))?
                }
            };
            gem_layer = Some(layer);
        }
        for &context in &self.cfg.contexts.clone() {
            let defs = lane_defs(&self.cfg, context, layers, hk)?;
            for i in 0..self.cfg.passkey_trials {
                bar.set_message(format!("{context} tokens: passkey {}/{}", i + 1, self.cfg.passkey_trials));
                let seed = self.cfg.seed.wrapping_add(1000 * context as u64 + i as u64);
                let trial = tasks::passkey(self.tok, context, tasks::depth(i, self.cfg.passkey_trials), seed);
                self.retrieval(&defs, &trial, gem_layer.as_ref().map(|g| g.0))?;
                bar.inc(1);
            }
            for i in 0..self.cfg.needle_trials {
                bar.set_message(format!("{context} tokens: needle {}/{}", i + 1, self.cfg.needle_trials));
                let seed = self.cfg.seed.wrapping_add(7_000_000 + 1000 * context as u64 + i as u64);
                let trial = tasks::needle(self.tok, self.kjv, context, tasks::depth(i, self.cfg.needle_trials), seed);
                self.retrieval(&defs, &trial, gem_layer.as_ref().map(|g| g.0))?;
                bar.inc(1);
            }
            for task in [Task::PasskeyKjvChat, Task::NeedleChat] {
                for i in 0..self.cfg.chat_trials {
                    bar.set_message(format!("{context} tokens: {} {}/{}", task.name(), i + 1, self.cfg.chat_trials));
                    let seed = self.cfg.seed.wrapping_add(17_000_000 + 1000 * context as u64 + i as u64);
                    let trial = task.trial(self.tok, self.kjv, context, tasks::depth(i, self.cfg.chat_trials), seed);
                    self.retrieval(&defs, &trial, gem_layer.as_ref().map(|g| g.0))?;
                    bar.inc(1);
                }
            }
            for i in 0..self.cfg.ppl_windows {
                bar.set_message(format!("{context} tokens: perplexity {}/{}", i + 1, self.cfg.ppl_windows));
                let seed = self.cfg.seed.wrapping_add(13_000_000 + 1000 * context as u64 + i as u64);
                let window = tasks::text_window(self.tok, self.kjv, context, seed);
                self.perplexity(&defs, &window, gem_layer.as_ref().map(|g| g.0))?;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(SweepResult { cells: self.cells, trials: self.trials, gemfilter_layer: gem_layer })
    }

    /// Prefill `context` once and fork it for every lane. Returns the caches, the lanes'
    /// sequences and the prefill time.
    fn fork_lanes(
        &mut self,
        defs: &[LaneDef],
        context: &[u32],
        extra_tokens: usize,
    ) -> Result<(Kv, Engine<'a>, Vec<u64>, f64)> {
        let m = self.model;
        let layers = m.cfg.num_layers;
        let ps = self.cfg.page_size;
        let with_pre = defs.iter().any(|d| side_for(&d.policy, layers) == Side::Pre);
        let extra = defs.len() * (extra_tokens.div_ceil(ps) + 2) + 2;
        let mut kv = Kv::new(m, context.len(), ps, extra, with_pre)?;
        let base = kv.create();
        let mut engine = Engine::new(m);
        let dense = Policy::dense();
        let t0 = Instant::now();
        prefill(
            &mut engine,
            &mut kv,
            &Lane::new(base, &dense, layers),
            context,
            &Step { mirror: with_pre, logits: Logits::None, ..Step::default() },
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let seqs = defs.iter().map(|_| kv.fork(base)).collect::<Result<Vec<_>>>()?;
        kv.free(base)?;
        Ok((kv, engine, seqs, secs))
    }

    /// Evict what sinks+window lanes will never read again, and note what each lane holds.
    fn evict(&self, kv: &mut Kv, lanes: &[Lane]) -> Result<()> {
        for l in lanes {
            kv.cache_mut(l.side).evict_for_policy(l.seq, l.policy)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record_lane(
        &mut self,
        def: &LaneDef,
        kv: &Kv,
        lane: &Lane,
        engine: &Engine,
        prefill_secs: f64,
        peak_pages: usize,
    ) -> Result<()> {
        let cache = kv.cache(lane.side);
        let page = cache.stats().bytes_per_page;
        let held = (cache.seq_pages(lane.seq)?.len() * page) as f64;
        let st = engine.stats.get(&lane.seq).copied().unwrap_or_default();
        let c = self.cell(&def.key, &def.text, def.budget);
        c.decode_steps += st.decode_steps;
        c.kv_bytes += st.decode_kv_bytes;
        c.dense_kv_bytes += st.decode_dense_kv_bytes;
        c.attention_secs += st.decode_attention_secs;
        c.prefill_secs += prefill_secs;
        c.prefills += 1;
        c.kv_bytes_held += held;
        c.kv_bytes_peak += (peak_pages * page) as f64;
        c.kv_samples += 1;
        Ok(())
    }

    fn retrieval(&mut self, defs: &[LaneDef], trial: &Trial, gem_layer: Option<usize>) -> Result<()> {
        let layers = self.model.cfg.num_layers;
        let extra = trial.question.len() + trial.answer_tokens;
        let (mut kv, mut engine, seqs, prefill_secs) = self.fork_lanes(defs, &trial.context, extra)?;
        let lanes: Vec<Lane> = defs.iter().zip(&seqs).map(|(d, &s)| Lane::new(s, &d.policy, layers)).collect();
        let index_secs = build_lane_clusters(&mut engine, &kv, &lanes, layers, self.model.cfg.num_kv_heads)?;
        let n = lanes.len();
        let mut peaks = vec![0usize; n];
        observe_peaks(&kv, &lanes, &mut peaks)?;
        let mut logits = Vec::new();
        for (i, &t) in trial.question.iter().enumerate() {
            let last = i + 1 == trial.question.len();
            let step = Step { logits: if last { Logits::Last } else { Logits::None }, ..Step::default() };
            logits = engine.forward(&mut kv, &lanes, &vec![t; n], &step)?.logits;
            observe_peaks(&kv, &lanes, &mut peaks)?;
            self.evict(&mut kv, &lanes)?;
        }
        let v = self.model.cfg.vocab_size;
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
        for step in 0..trial.answer_tokens {
            let next: Vec<u32> = logits.chunks(v).map(argmax).collect();
            for (g, &t) in generated.iter_mut().zip(&next) {
                g.push(t);
            }
            if step + 1 < trial.answer_tokens {
                logits = engine.forward(&mut kv, &lanes, &next, &Step::default())?.logits;
                observe_peaks(&kv, &lanes, &mut peaks)?;
                self.evict(&mut kv, &lanes)?;
            }
        }
        for (i, ((def, lane), g)) in defs.iter().zip(&lanes).zip(&generated).enumerate() {
            let text = self.tok.decode(g);
            let ok = trial.is_correct(&text);
            self.record_trial(def.key.clone(), trial, text, ok);
            self.record_lane(def, &kv, lane, &engine, prefill_secs + index_secs[i], peaks[i])?;
            let c = self.cell(&def.key, &def.text, def.budget);
            let e = c.correct.entry(trial.task.name()).or_default();
            e.0 += usize::from(ok);
            e.1 += 1;
        }
        if let Some(layer) = gem_layer {
            let prompt: Vec<u32> = trial.context.iter().chain(&trial.question).copied().collect();
            let runs =
                self.gemfilter(&prompt, trial.question.len(), layer, trial.context.len(), trial.answer_tokens, None)?;
            for run in runs {
                let text = self.tok.decode(&run.generated);
                let ok = trial.is_correct(&text);
                let key = self.gem_key(trial.context.len(), &run);
                self.record_trial(key, trial, text, ok);
                let c = self.gem_cell(trial.context.len(), &run, layer);
                let e = c.correct.entry(trial.task.name()).or_default();
                e.0 += usize::from(ok);
                e.1 += 1;
            }
        }
        Ok(())
    }

    fn gem_key(&self, context_len: usize, run: &GemRun) -> CellKey {
        (self.context_of(context_len), "gemfilter".to_string(), frac_key(run.frac))
    }

    fn record_trial(&mut self, key: CellKey, trial: &Trial, generated: String, correct: bool) {
        self.trials.push(TrialRecord {
            key,
            task: trial.task.name(),
            depth: trial.depth,
            answer: trial.answer.clone(),
            generated,
            correct,
        });
    }

    fn gem_cell(&mut self, context_len: usize, run: &GemRun, layer: usize) -> &mut Cell {
        let key = self.gem_key(context_len, run);
        let c = self.cell(&key, &format!("gemfilter layer={layer} k={}", run.k), run.k);
        c.decode_steps += run.stats.decode_steps;
        c.kv_bytes += run.stats.decode_kv_bytes;
        c.dense_kv_bytes += run.stats.decode_dense_kv_bytes;
        c.attention_secs += run.stats.decode_attention_secs;
        c.prefill_secs += run.prefill_secs;
        c.prefills += 1;
        c.kv_bytes_held += run.kv_bytes_held;
        c.kv_bytes_peak += run.kv_bytes_peak;
        c.kv_samples += 1;
        c
    }

    /// The configured context length a prompt of `len` tokens belongs to.
    fn context_of(&self, len: usize) -> usize {
        *self.cfg.contexts.iter().min_by_key(|&&c| c.abs_diff(len)).unwrap_or(&len)
    }

    /// GemFilter on `prompt` (its last `keep_last` tokens are kept): layers `0..=layer` over
    /// the whole prompt once, then per budget a re-prefill of the kept tokens with fresh
    /// positions and `answer_tokens` greedy tokens, or teacher-forced `eval` tokens.
    fn gemfilter(
        &self,
        prompt: &[u32],
        keep_last: usize,
        layer: usize,
        context: usize,
        answer_tokens: usize,
        eval: Option<&[u32]>,
    ) -> Result<Vec<GemRun>> {
        let m = self.model;
        let (hq, hd, layers) = (m.cfg.num_heads, m.cfg.head_dim, m.cfg.num_layers);
        let ps = self.cfg.page_size;
        let dense = Policy::dense();
        let t0 = Instant::now();
        let mut kv = Kv::with_layers(m, layer + 1, prompt.len(), ps, 1, false)?;
        let seq = kv.create();
        let mut engine = Engine::new(m);
        let out = prefill(
            &mut engine,
            &mut kv,
            &Lane::new(seq, &dense, layers),
            prompt,
            &Step { layers: Some(layer + 1), capture_queries: true, logits: Logits::None, ..Step::default() },
        )?;
        let q = TensorView::new(&out.queries[layer], &[hq, hd])?;
        let mut picks = Vec::new();
        for &f in &self.cfg.budgets {
            let k = ((context as f64) * f).round() as usize;
            if k < keep_last + 8 || k > prompt.len() {
                continue;
            }
            picks.push((
                f,
                k,
                gemfilter::select(&q, KeySource::Cache { cache: &kv.post, seq, layer }, &filter_config(k, keep_last))?,
            ));
        }
        let first_pass = t0.elapsed().as_secs_f64();
        // The first pass holds the whole prompt, for its layers only.
        let first_peak = kv.post.stats().bytes_used as f64;
        drop(kv);
        let v = m.cfg.vocab_size;
        let mut runs = Vec::new();
        for (frac, k, kept) in picks {
            let tokens: Vec<u32> = kept.iter().map(|&t| prompt[t as usize]).collect();
            let extra = answer_tokens + eval.map_or(0, |e| e.len());
            let t1 = Instant::now();
            let mut kv = Kv::new(m, tokens.len() + extra, ps, 2, false)?;
            let seq = kv.create();
            let mut engine = Engine::new(m);
            let lane = Lane::new(seq, &dense, layers);
            let mut logits = prefill(&mut engine, &mut kv, &lane, &tokens, &Step::default())?.logits;
            let prefill_secs = first_pass + t1.elapsed().as_secs_f64();
            let mut peak = kv.post.stats().bytes_used;
            let mut generated = Vec::new();
            let (mut nll, mut count) = (0.0, 0);
            match eval {
                None => {
                    for step in 0..answer_tokens {
                        let t = argmax(&logits);
                        generated.push(t);
                        if step + 1 < answer_tokens {
                            logits = engine.forward(&mut kv, &[lane], &[t], &Step::default())?.logits;
                            peak = peak.max(kv.post.stats().bytes_used);
                        }
                    }
                }
                Some(e) => {
                    for w in e.windows(2) {
                        logits = engine.forward(&mut kv, &[lane], &[w[0]], &Step::default())?.logits;
                        nll -= log_prob(&logits[..v], w[1]);
                        count += 1;
                        peak = peak.max(kv.post.stats().bytes_used);
                    }
                }
            }
            let held = (kv.post.seq_pages(seq)?.len() * kv.post.stats().bytes_per_page) as f64;
            runs.push(GemRun {
                frac,
                k,
                generated,
                nll,
                count,
                prefill_secs,
                kv_bytes_held: held,
                kv_bytes_peak: first_peak.max(peak as f64),
                stats: engine.stats.get(&seq).copied().unwrap_or_default(),
            });
        }
        Ok(runs)
    }

    fn perplexity(&mut self, defs: &[LaneDef], window: &[u32], gem_layer: Option<usize>) -> Result<()> {
        let layers = self.model.cfg.num_layers;
        let e = self.cfg.ppl_eval_tokens.min(window.len() / 2);
        let (context, eval) = window.split_at(window.len() - e);
        let (mut kv, mut engine, seqs, prefill_secs) = self.fork_lanes(defs, context, e)?;
        let lanes: Vec<Lane> = defs.iter().zip(&seqs).map(|(d, &s)| Lane::new(s, &d.policy, layers)).collect();
        let index_secs = build_lane_clusters(&mut engine, &kv, &lanes, layers, self.model.cfg.num_kv_heads)?;
        let n = lanes.len();
        let v = self.model.cfg.vocab_size;
        let mut nll = vec![0f64; n];
        let mut peaks = vec![0usize; n];
        observe_peaks(&kv, &lanes, &mut peaks)?;
        for w in eval.windows(2) {
            let logits = engine.forward(&mut kv, &lanes, &vec![w[0]; n], &Step::default())?.logits;
            for (i, row) in logits.chunks(v).enumerate() {
                nll[i] -= log_prob(row, w[1]);
            }
            observe_peaks(&kv, &lanes, &mut peaks)?;
            self.evict(&mut kv, &lanes)?;
        }
        for (i, ((def, lane), nl)) in defs.iter().zip(&lanes).zip(&nll).enumerate() {
            self.record_lane(def, &kv, lane, &engine, prefill_secs + index_secs[i], peaks[i])?;
            let c = self.cell(&def.key, &def.text, def.budget);
            c.nll += nl;
            c.nll_count += e - 1;
        }
        drop(kv);
        if let Some(layer) = gem_layer {
            let keep_last = 16.min(context.len());
            let runs = self.gemfilter(context, keep_last, layer, window.len(), 0, Some(eval))?;
            for run in runs {
                let c = self.gem_cell(window.len(), &run, layer);
                c.nll += run.nll;
                c.nll_count += run.count;
            }
        }
        Ok(())
    }
}

/// GemFilter's settings here: pool of 5, the first 4 tokens (attention sinks) and the
/// question always kept.
fn filter_config(k: usize, keep_last: usize) -> GemFilterConfig {
    GemFilterConfig { k, pool_kernel: 5, keep_first: 4, keep_last }
}

struct GemRun {
    frac: f64,
    k: usize,
    generated: Vec<u32>,
    nll: f64,
    count: usize,
    prefill_secs: f64,
    kv_bytes_held: f64,
    /// The most KV bytes held at once over both passes.
    kv_bytes_peak: f64,
    stats: crate::engine::Stats,
}
