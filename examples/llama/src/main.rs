//! `kvsieve-llama`: run SmolLM2-135M-Instruct (or another Llama GGUF) on kvsieve.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kvsieve::Policy;
use kvsieve_llama::engine::Result;
use kvsieve_llama::{default_model_path, generate, model::Model};

#[derive(Parser)]
#[command(name = "kvsieve-llama", about = "A Llama-architecture CPU engine on kvsieve, and its policy evaluation")]
struct Cli {
    /// GGUF model file (default: where scripts/fetch-model.sh puts SmolLM2-135M-Instruct).
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the next token's most likely tokens as JSON: {"tokens": [...], "probs": [...]}.
    Logits {
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
    /// Greedy generation.
    Generate {
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// kvsieve policy in its text form (e.g. "sinks=4,window=256").
        #[arg(long, default_value = "dense")]
        policy: String,
    },
    /// Perplexity of the first `tokens` tokens of a text (default: the KJV) under dense
    /// attention; prints JSON with the perplexity, the token ids and the time taken.
    Perplexity {
        /// A UTF-8 text file (default: the KJV from scripts/fetch-text.sh).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        /// Also write the token ids, one per line, to this file.
        #[arg(long)]
        dump_tokens: Option<PathBuf>,
    },
    /// Evaluate policies × KV budgets × context lengths: passkey and needle accuracy,
    /// perplexity change, KV bytes read and attention time per decode step, prefill time.
    /// Writes sweep.csv, trials.csv and accuracy.svg to --out and prints a table. Defaults are a short
    /// run; --full is the whole grid.
    Sweep(SweepArgs),
    /// Past the 8K training window: passkey and needle (synthetic and natural filler, chat
    /// template) under dense, the Λ-mask and span retrieval, and perplexity per 1K-token
    /// bucket; writes `long.csv` (and `ppl.csv`, `ppl.svg`) under `--out`.
    Long(LongArgs),
    /// Print the token ids of a text as JSON.
    Tokenize {
        #[arg(long)]
        text: String,
    },
}

#[derive(clap::Args)]
struct SweepArgs {
    /// The full grid: contexts 2048,4096,8192, budgets 1/2..1/16, 20 passkey and 10 needle
    /// trials, 2 perplexity windows per context (hours on 2 cores).
    #[arg(long)]
    full: bool,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',')]
    contexts: Option<Vec<usize>>,
    /// KV budgets as fractions of the context (1/8 or 0.125), comma-separated.
    #[arg(long, value_delimiter = ',')]
    budgets: Option<Vec<String>>,
    /// Only these of the built-in policies (names, `gemfilter` included), comma-separated;
    /// dense and --policy ones always run.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Add or replace a policy: NAME=TEXT in kvsieve's policy text, where {budget} is the
    /// budget in tokens and {budget-N} the budget less N.
    #[arg(long = "policy", value_name = "NAME=TEXT")]
    extra: Vec<String>,
    /// Leave GemFilter out.
    #[arg(long)]
    no_gemfilter: bool,
    /// GemFilter's filter layer (default: calibrated on needle prompts).
    #[arg(long)]
    gemfilter_layer: Option<usize>,
    #[arg(long)]
    passkey_trials: Option<usize>,
    #[arg(long)]
    needle_trials: Option<usize>,
    /// Trials of each chat-template task on natural text (passkey in KJV, needle in KJV)
    /// per context [default: 0, --full: 10].
    #[arg(long)]
    chat_trials: Option<usize>,
    /// Perplexity windows per context.
    #[arg(long)]
    ppl_windows: Option<usize>,
    /// Tokens evaluated at the end of each perplexity window.
    #[arg(long, default_value_t = 128)]
    ppl_tokens: usize,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output folder for sweep.csv, trials.csv and accuracy.svg.
    #[arg(long, default_value = "target/llama-eval")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct LongArgs {
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = vec![16384, 32768])]
    lengths: Vec<usize>,
    /// Trials per (length, task) (depths spread evenly).
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Tasks, comma-separated: passkey (synthetic filler), passkey-kjv-chat (KJV filler in
    /// the chat template), needle (KJV), needle-chat (KJV in the chat template).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["passkey".to_string(), "passkey-kjv-chat".to_string()])]
    tasks: Vec<String>,
    /// A policy as NAME=TEXT (repeatable; `{prefix}` is the prompt's opening length in tokens);
    /// replaces the default set (dense, lambda, cspans).
    #[arg(long = "policy", value_name = "NAME=TEXT")]
    policies: Vec<String>,
    /// Only these of the policies (names), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Also measure KJV perplexity per 1K-token bucket over this many tokens (each policy's
    /// prefill form), writing ppl.csv and ppl.svg; 0 skips it.
    #[arg(long, default_value_t = 0)]
    ppl_tokens: usize,
    /// Only draw ppl.svg under --out from these ppl.csv files (comma-separated), merged.
    #[arg(long, value_delimiter = ',')]
    plot_ppl: Option<Vec<PathBuf>>,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "target/llama-eval")]
    out: PathBuf,
}

fn long(model: &Model, tok: &kvsieve_llama::tokenizer::Tokenizer, a: LongArgs) -> Result<()> {
    use kvsieve_llama::long::{
        default_policies, perplexity, ppl_svg, run, summary, write_csv, write_ppl_csv, LongConfig,
    };
    use kvsieve_llama::tasks::Task;
    let mut policies = if a.policies.is_empty() { default_policies() } else { Vec::new() };
    for p in &a.policies {
        let (name, text) = p.split_once('=').ok_or_else(|| format!("--policy {p}: expected NAME=TEXT"))?;
        policies.push((name.to_string(), text.to_string()));
    }
    if let Some(only) = &a.only {
        policies.retain(|(n, _)| only.contains(n));
    }
    let tasks = a
        .tasks
        .iter()
        .map(|t| Task::parse(t).ok_or_else(|| format!("--tasks: unknown task {t}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&a.out)?;
    if let Some(files) = &a.plot_ppl {
        let mut ppl = std::collections::BTreeMap::new();
        for f in files {
            kvsieve_llama::long::read_ppl_csv(f, &mut ppl)?;
        }
        std::fs::write(a.out.join("ppl.svg"), ppl_svg(&ppl, 1024, model.cfg.context_length.max(1)))?;
        println!("plot: {}", a.out.join("ppl.svg").display());
        return Ok(());
    }
    let kjv = kvsieve_llama::text::kjv()?;
    let t0 = std::time::Instant::now();
    if a.ppl_tokens > 0 {
        let tokens = kvsieve_llama::tasks::text_window(tok, &kjv, a.ppl_tokens, a.seed);
        let bucket = 1024;
        let ppl = perplexity(model, &tokens, &policies, bucket, a.page_size, &mut |name, done, p| {
            eprintln!("[{:>5.0} s] ppl {name}: {done} tokens, last bucket {p:.2}", t0.elapsed().as_secs_f64())
        })?;
        write_ppl_csv(&ppl, bucket, &a.out.join("ppl.csv"))?;
        std::fs::write(a.out.join("ppl.svg"), ppl_svg(&ppl, bucket, model.cfg.context_length.max(1)))?;
        for (name, (v, secs)) in &ppl {
            let k = v.len().min(8);
            let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
            println!(
                "ppl {name}: first {k}K {:.3}, last {k}K {:.3} ({:+.1}%), {secs:.0} s; per bucket {:?}",
                mean(&v[..k]),
                mean(&v[v.len() - k..]),
                100.0 * (mean(&v[v.len() - k..]) / mean(&v[..k]) - 1.0),
                v.iter().map(|p| (p * 100.0).round() / 100.0).collect::<Vec<_>>()
            );
        }
    }
    if a.trials == 0 || tasks.is_empty() {
        return Ok(());
    }
    let cfg =
        LongConfig { lengths: a.lengths, trials: a.trials, tasks, policies, page_size: a.page_size, seed: a.seed };
    let rows = run(model, tok, &kjv, &cfg, &mut |r| {
        eprintln!(
            "[{:>5.0} s] {} tokens, {}, {}, trial {} (depth {:.2}): {} (answer {}, generated {:?}), prefill {:.1} s, KV {:.0} KB/step, fact recall {:.3}",
            t0.elapsed().as_secs_f64(),
            r.length,
            r.task.name(),
            r.policy,
            r.trial,
            r.depth,
            if r.correct { "right" } else { "wrong" },
            r.answer,
            r.generated,
            r.prefill_secs,
            r.kv_bytes_per_step / 1024.0,
            r.fact_recall
        )
    })?;
    let csv = a.out.join("long.csv");
    write_csv(&rows, &csv)?;
    print!("{}", summary(&rows));
    println!("({:.0} s) CSV: {}", t0.elapsed().as_secs_f64(), csv.display());
    Ok(())
}

fn parse_frac(s: &str) -> Result<f64> {
    let f = match s.split_once('/') {
        Some((a, b)) => a.trim().parse::<f64>()? / b.trim().parse::<f64>()?,
        None => s.trim().parse::<f64>()?,
    };
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!("budget {s}: expected a fraction in (0, 1]").into());
    }
    Ok(f)
}

fn sweep(model: &Model, tok: &kvsieve_llama::tokenizer::Tokenizer, a: SweepArgs) -> Result<()> {
    use kvsieve_llama::sweep::{default_policies, PolicyDef, Sweep, SweepConfig};
    let full = a.full;
    let budgets = match a.budgets {
        Some(b) => b.iter().map(|s| parse_frac(s)).collect::<Result<Vec<_>>>()?,
        None if full => vec![0.5, 0.25, 0.125, 0.0625],
        None => vec![0.25, 0.125],
    };
    let mut policies = default_policies();
    let mut gemfilter = !a.no_gemfilter;
    if let Some(only) = &a.only {
        policies.retain(|p| only.contains(&p.name));
        gemfilter &= only.iter().any(|o| o == "gemfilter");
    }
    for e in &a.extra {
        let (name, text) = e.split_once('=').ok_or_else(|| format!("--policy {e}: expected NAME=TEXT"))?;
        policies.retain(|p| p.name != name);
        policies.push(PolicyDef::new(name, text));
    }
    let cfg = SweepConfig {
        contexts: a.contexts.unwrap_or(if full { vec![2048, 4096, 8192] } else { vec![2048] }),
        budgets,
        policies,
        gemfilter,
        gemfilter_layer: a.gemfilter_layer,
        passkey_trials: a.passkey_trials.unwrap_or(if full { 20 } else { 4 }),
        needle_trials: a.needle_trials.unwrap_or(if full { 10 } else { 2 }),
        chat_trials: a.chat_trials.unwrap_or(if full { 10 } else { 0 }),
        ppl_windows: a.ppl_windows.unwrap_or(if full { 2 } else { 1 }),
        ppl_eval_tokens: a.ppl_tokens,
        page_size: a.page_size,
        seed: a.seed,
    };
    let kjv = kvsieve_llama::text::kjv()?;
    let t0 = std::time::Instant::now();
    let result = Sweep { model, tok, kjv: &kjv, cfg, cells: Default::default(), trials: Vec::new() }.run(!a.quiet)?;
    std::fs::create_dir_all(&a.out)?;
    let csv = a.out.join("sweep.csv");
    let svg = a.out.join("accuracy.svg");
    kvsieve_llama::report::write_csv(&result, &csv)?;
    kvsieve_llama::report::write_svg(&result, &svg)?;
    let trials_csv = a.out.join("trials.csv");
    kvsieve_llama::report::write_trials_csv(&result, &trials_csv)?;
    if let Some((layer, recall)) = &result.gemfilter_layer {
        if recall.is_empty() {
            println!("GemFilter filter layer: {layer} (given)");
        } else {
            let r: Vec<String> = recall.iter().map(|r| format!("{r:.2}")).collect();
            println!("GemFilter filter layer: {layer} (calibrated: earliest within 0.05 of the best recall of planted facts at a 1/8 budget; recall per layer: {})", r.join(" "));
        }
    }
    print!("{}", kvsieve_llama::report::table(&result));
    println!(
        "({:.0} s) CSV: {}  per trial: {}  plot: {}",
        t0.elapsed().as_secs_f64(),
        csv.display(),
        trials_csv.display(),
        svg.display()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let path = cli.model.unwrap_or_else(default_model_path);
    if !path.exists() {
        return Err(format!("{}: no model file (run scripts/fetch-model.sh)", path.display()).into());
    }
    let (model, tok) = Model::open(&path)?;
    match cli.cmd {
        Cmd::Logits { prompt, top } => {
            let best = generate::next_token_top_k(&model, &tok, &prompt, top)?;
            let tokens: Vec<String> = best.iter().map(|&(t, _)| tok.decode(&[t])).collect();
            let probs: Vec<f64> = best.iter().map(|&(_, p)| (p * 1e6).round() / 1e6).collect();
            println!("{}", serde_json::json!({ "tokens": tokens, "probs": probs }));
        }
        Cmd::Generate { prompt, max_tokens, policy } => {
            let policy = Policy::parse(&policy)?;
            let out = generate::generate(&model, &tok, &prompt, max_tokens, &policy)?;
            println!("{}", tok.decode(&out));
        }
        Cmd::Perplexity { file, tokens, dump_tokens } => {
            let text = match file {
                Some(f) => std::fs::read_to_string(f)?,
                None => kvsieve_llama::text::kjv()?,
            };
            let mut ids = tok.encode(&text);
            if ids.len() < tokens {
                return Err(format!("the text has {} tokens, fewer than {tokens}", ids.len()).into());
            }
            ids.truncate(tokens);
            if let Some(p) = dump_tokens {
                std::fs::write(p, ids.iter().map(|t| format!("{t}\n")).collect::<String>())?;
            }
            let t0 = std::time::Instant::now();
            let ppl = kvsieve_llama::perplexity::perplexity(&model, &ids)?;
            println!(
                "{}",
                serde_json::json!({ "perplexity": ppl, "tokens": tokens, "seconds": t0.elapsed().as_secs_f64() })
            );
        }
        Cmd::Sweep(a) => sweep(&model, &tok, a)?,
        Cmd::Long(a) => long(&model, &tok, a)?,
        Cmd::Tokenize { text } => {
            println!("{}", serde_json::json!(tok.encode(&text)));
        }
    }
    Ok(())
}
