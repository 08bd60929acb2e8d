//! Correctness on the real model (SmolLM2-135M-Instruct, fetched by scripts/fetch-model.sh):
//! pinned next-token distributions, the CLI's JSON, tokenisation and perplexity against an
//! independent numpy implementation (tests/reference.py). Run with `--release`: in a debug
//! build the perplexity comparison (2048 tokens through 135M parameters) is too slow and is
//! ignored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kvsieve_llama::model::Model;
use kvsieve_llama::tokenizer::Tokenizer;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/fetch-model.sh"))
            .output()
            .expect("run scripts/fetch-model.sh");
        assert!(out.status.success(), "fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap())
    })
    .clone()
}

fn model() -> &'static (Model, Tokenizer) {
    static M: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    M.get_or_init(|| Model::open(&model_path()).expect("load the model"))
}

/// The repo's venv python with numpy, gguf and tokenizers installed.
fn python() -> PathBuf {
    let root = repo_root();
    let py = root.join(".venv/bin/python");
    if !py.exists() {
        let ok = Command::new("bash").arg(root.join("scripts/setup.sh")).status().unwrap().success();
        assert!(ok, "scripts/setup.sh failed");
    }
    let have = Command::new(&py).args(["-c", "import numpy, gguf, tokenizers"]).status().unwrap().success();
    if !have {
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "numpy", "gguf", "tokenizers"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install numpy gguf tokenizers failed");
    }
    py
}

fn reference(what: &str, input: &Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference.py"))
        .arg(model_path())
        .arg(what)
        .arg(input)
        .output()
        .unwrap();
    assert!(out.status.success(), "reference.py {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsieve-llama-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn config_comes_from_the_file() {
    let (m, tok) = model();
    let c = &m.cfg;
    assert_eq!((c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff), (30, 576, 9, 3, 64, 1536));
    assert_eq!((c.rope_theta, c.context_length, c.vocab_size), (100000.0, 8192, 49152));
    assert!((c.rms_eps - 1e-5).abs() < 1e-9);
    assert!(m.output.is_none(), "SmolLM2 ties the output projection to the token embedding");
    assert!(!tok.add_bos, "the file says tokenizer.ggml.add_bos_token = false");
}

#[test]
fn next_token_top5_is_pinned() {
    let (m, tok) = model();
    let cases: [(&str, [&str; 5], [f64; 5]); 3] = [
        (
            "The capital of France is",
            [" Paris", " the", " London", " Le", " New"],
            [0.7720, 0.0647, 0.0125, 0.0099, 0.0093],
        ),
        ("1, 2, 3, 4,", [" ", " and", " ...", " etc", " -"], [0.9259, 0.0280, 0.0067, 0.0046, 0.0045]),
        (
            "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n",
            ["The", "Germany", "Der", "L", "Ber"],
            [0.6703, 0.1077, 0.0461, 0.0192, 0.0150],
        ),
    ];
    for (prompt, tokens, probs) in cases {
        let got = kvsieve_llama::generate::next_token_top_k(m, tok, prompt, 5).unwrap();
        let words: Vec<String> = got.iter().map(|&(t, _)| tok.decode(&[t])).collect();
        assert_eq!(words, tokens, "{prompt:?}");
        for ((_, p), want) in got.iter().zip(probs) {
            assert!((p - want).abs() < 0.005, "{prompt:?}: probability {p} vs pinned {want}");
        }
    }
}

#[test]
fn cli_logits_prints_paris_first() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsieve-llama"))
        .args([
            "--model",
            model_path().to_str().unwrap(),
            "logits",
            "--prompt",
            "The capital of France is",
            "--top",
            "5",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"][0], " Paris");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    let p = v["probs"][0].as_f64().unwrap();
    assert!((p - 0.772).abs() < 0.005, "p(' Paris') = {p}");
}

#[test]
fn tokenizer_matches_hugging_face_tokenizers() {
    let (_, tok) = model();
    let mut text = String::from(
        "The capital of France is Paris. In 1984, 12345 people said: \"Don't!\"  Hello   world\n\ttabs\tand\n\
         newlines<|im_start|>user\nWhat's the pass key?<|im_end|> émigré naïve 日本語 🙂 x²+y³ ½ -- ...   \n",
    );
    text.push_str(&kvsieve_llama::text::kjv().unwrap()[..6000]);
    let path = tmp("tokenize.txt");
    std::fs::write(&path, &text).unwrap();
    let want: Vec<u32> = serde_json::from_value(reference("tokenize", &path)).unwrap();
    assert_eq!(tok.encode(&text), want);
    assert_eq!(tok.decode(&want), text, "decoding gives the text back");
}

#[test]
#[cfg_attr(debug_assertions, ignore = "2048 tokens through the model need a release build (cargo test --release)")]
fn perplexity_matches_numpy_reference() {
    let (m, tok) = model();
    let mut ids = tok.encode(&kvsieve_llama::text::kjv().unwrap());
    ids.truncate(2048);
    let path = tmp("ppl_tokens.txt");
    std::fs::write(&path, ids.iter().map(|t| format!("{t}\n")).collect::<String>()).unwrap();
    let ours = kvsieve_llama::perplexity::perplexity(m, &ids).unwrap();
    let theirs = reference("ppl", &path)["perplexity"].as_f64().unwrap();
    let rel = (ours - theirs).abs() / theirs;
    eprintln!("perplexity over 2048 KJV tokens: kvsieve-llama {ours:.5}, numpy reference {theirs:.5}, relative difference {rel:.2e}");
    assert!(rel < 0.005, "perplexity {ours} vs reference {theirs}");
    assert!(ours < 8.0, "the model predicts the text well (perplexity {ours})");
}
