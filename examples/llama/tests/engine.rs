//! The engine's kvsieve paths on the real model at short contexts: keys stored before RoPE
//! (kvsieve rotating them at read time) against keys stored after; a batched decode of
//! forks against decoding each alone; chunked prefill against one call; a seeded passkey
//! answered by dense attention and by a generous page-bound policy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kvsieve::Policy;
use kvsieve_llama::engine::{argmax, Engine, Kv, Lane, Logits, Side, Step};
use kvsieve_llama::generate::prefill;
use kvsieve_llama::model::Model;
use kvsieve_llama::tokenizer::Tokenizer;

fn model() -> &'static (Model, Tokenizer) {
    static M: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    M.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model.sh");
        let out = Command::new("bash").arg(script).output().expect("run scripts/fetch-model.sh");
        assert!(out.status.success(), "fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap());
        Model::open(&path).expect("load the model")
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const PROMPT: &str =
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking";

#[test]
fn pre_rope_cache_matches_post_rope_cache() {
    let (m, tok) = model();
    let ids = tok.encode(PROMPT);
    let dense = Policy::dense();
    let layers = m.cfg.num_layers;
    let mut kv = Kv::new(m, ids.len() + 4, 16, 2, true).unwrap();
    let a = kv.create();
    let b = kv.create();
    let mut e = Engine::new(m);
    let post = Lane { seq: a, side: Side::Post, policy: &dense };
    let pre = Lane { seq: b, side: Side::Pre, policy: &dense };
    let la = prefill(&mut e, &mut kv, &post, &ids, &Step::default()).unwrap().logits;
    let lb = prefill(&mut e, &mut kv, &pre, &ids, &Step::default()).unwrap().logits;
    assert!(max_diff(&la, &lb) < 2e-2, "prefill logits differ by {}", max_diff(&la, &lb));
    let t = argmax(&la);
    let da = e.forward(&mut kv, &[post], &[t], &Step::default()).unwrap().logits;
    let db = e.forward(&mut kv, &[pre], &[t], &Step::default()).unwrap().logits;
    assert!(max_diff(&da, &db) < 2e-2, "decode logits differ by {}", max_diff(&da, &db));
    assert_eq!(layers, 30);
}

#[test]
fn batched_decode_of_forks_matches_single_decodes_and_chunked_prefill_matches_one_call() {
    let (m, tok) = model();
    let ids = tok.encode(PROMPT);
    let dense = Policy::dense();
    let window = Policy::parse("sinks=4,window=8,positions=contiguous").unwrap();
    let layers = m.cfg.num_layers;
    let mut kv = Kv::new(m, ids.len() + 8, 16, 16, true).unwrap();
    let base = kv.create();
    let mut e = Engine::new(m);
    // Two chunks, mirrored into the pre-RoPE cache, against one call.
    let lane = Lane::new(base, &dense, layers);
    e.forward(&mut kv, &[lane], &ids[..7], &Step { mirror: true, logits: Logits::None, ..Step::default() }).unwrap();
    let chunked = e.forward(&mut kv, &[lane], &ids[7..], &Step { mirror: true, ..Step::default() }).unwrap().logits;
    let other = kv.create();
    let whole = prefill(&mut e, &mut kv, &Lane::new(other, &dense, layers), &ids, &Step::default()).unwrap().logits;
    assert!(max_diff(&chunked, &whole) < 2e-2, "chunked prefill differs by {}", max_diff(&chunked, &whole));

    let f1 = kv.fork(base).unwrap();
    let f2 = kv.fork(base).unwrap();
    let s1 = kv.fork(base).unwrap();
    let s2 = kv.fork(base).unwrap();
    let t = [argmax(&whole), 13];
    let batched = e
        .forward(&mut kv, &[Lane::new(f1, &dense, layers), Lane::new(f2, &window, layers)], &t, &Step::default())
        .unwrap()
        .logits;
    let one = e.forward(&mut kv, &[Lane::new(s1, &dense, layers)], &t[..1], &Step::default()).unwrap().logits;
    let two = e.forward(&mut kv, &[Lane::new(s2, &window, layers)], &t[1..], &Step::default()).unwrap().logits;
    let v = m.cfg.vocab_size;
    assert!(max_diff(&batched[..v], &one) < 1e-3);
    assert!(max_diff(&batched[v..], &two) < 1e-3);
    assert!(max_diff(&one, &two) > 1e-2, "the window policy changes the result");
    for s in [base, other, f1, f2, s1, s2] {
        kv.free(s).unwrap();
    }
    assert_eq!(kv.post.stats().pages_used, 0);
    assert_eq!(kv.pre.as_ref().unwrap().stats().pages_used, 0);
}

#[test]
fn passkey_at_512_tokens_dense_and_page_bounds() {
    let (m, tok) = model();
    for seed in 0..2 {
        let trial = kvsieve_llama::tasks::passkey(tok, 512, 0.3 + 0.4 * seed as f64, seed);
        let prompt = format!("{}{}", tok.decode(&trial.context), tok.decode(&trial.question));
        for policy in ["dense", "sinks=4,window=64,pages=192"] {
            let out = kvsieve_llama::generate::generate(
                m,
                tok,
                &prompt,
                trial.answer_tokens,
                &Policy::parse(policy).unwrap(),
            )
            .unwrap();
            let text = tok.decode(&out);
            assert!(trial.is_correct(&text), "{policy}, seed {seed}: key {} but answered {text:?}", trial.answer);
        }
    }
}

#[test]
fn policy_text_templates() {
    use kvsieve_llama::sweep::PolicyDef;
    let p = PolicyDef::new("x", "sinks=4,window={budget-4},max_distance={budget}");
    assert_eq!(p.text(256).as_deref(), Some("sinks=4,window=252,max_distance=256"));
    assert_eq!(p.text(4), None, "a budget that leaves no window is skipped");
}
