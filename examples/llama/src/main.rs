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
    /// Print the token ids of a text as JSON.
    Tokenize {
        #[arg(long)]
        text: String,
    },
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
            println!("{}", serde_json::json!({ "perplexity": ppl, "tokens": tokens, "seconds": t0.elapsed().as_secs_f64() }));
        }
        Cmd::Tokenize { text } => {
            println!("{}", serde_json::json!(tok.encode(&text)));
        }
    }
    Ok(())
}
