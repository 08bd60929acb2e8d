//! Prompts in, tokens out: next-token distributions and greedy generation.

use kvsieve::Policy;

use crate::engine::{argmax, top_k, Engine, Kv, Lane, Logits, Result, Step, StepOut};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Tokens per prefill call: bounds activation memory for long prompts.
pub const PREFILL_CHUNK: usize = 1024;

/// Prefill `tokens` into sequence `seq` in chunks; returns the last token's logits.
pub fn prefill(engine: &mut Engine, kv: &mut Kv, lane: &Lane, tokens: &[u32], step: &Step) -> Result<StepOut> {
    prefill_chunked(engine, kv, lane, tokens, step, PREFILL_CHUNK)
}

/// [`prefill`] in chunks of `chunk` tokens (a windowed policy's chunk reads its window plus
/// the chunk, so smaller chunks read less).
pub fn prefill_chunked(
    engine: &mut Engine,
    kv: &mut Kv,
    lane: &Lane,
    tokens: &[u32],
    step: &Step,
    chunk: usize,
) -> Result<StepOut> {
    let chunk = chunk.max(1);
    let mut last = StepOut::default();
    for (i, part) in tokens.chunks(chunk).enumerate() {
        let is_last = (i + 1) * chunk >= tokens.len();
        let s = Step {
            logits: if is_last { step.logits } else { Logits::None },
            capture_queries: is_last && step.capture_queries,
            ..*step
        };
        last = engine.forward(kv, std::slice::from_ref(lane), part, &s)?;
    }
    Ok(last)
}

/// The next-token distribution's `k` most likely tokens after `prompt` (dense attention).
pub fn next_token_top_k(model: &Model, tok: &Tokenizer, prompt: &str, k: usize) -> Result<Vec<(u32, f64)>> {
    let ids = tok.encode(prompt);
    let mut kv = Kv::new(model, ids.len() + 1, 16, 1, false)?;
    let seq = kv.create();
    let mut engine = Engine::new(model);
    let policy = Policy::dense();
    let lane = Lane::new(seq, &policy, model.cfg.num_layers);
    let logits = prefill(&mut engine, &mut kv, &lane, &ids, &Step::default())?.logits;
    Ok(top_k(&logits, k))
}

/// Greedy generation of at most `max_tokens` after `prompt` under `policy`, stopping at the
/// end-of-sequence token. Returns the new tokens.
pub fn generate(model: &Model, tok: &Tokenizer, prompt: &str, max_tokens: usize, policy: &Policy) -> Result<Vec<u32>> {
    let ids = tok.encode(prompt);
    let side = crate::engine::side_for(policy, model.cfg.num_layers);
    let mut kv = Kv::new(model, ids.len() + max_tokens + 1, 16, 1, side == crate::engine::Side::Pre)?;
    let seq = kv.create();
    let mut engine = Engine::new(model);
    let lane = Lane { seq, side, policy };
    let step = Step::default();
    let mut logits = prefill(&mut engine, &mut kv, &lane, &ids, &step)?.logits;
    engine.build_clusters(&kv, &lane)?;
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let t = argmax(&logits);
        if Some(t) == tok.eos {
            break;
        }
        out.push(t);
        logits = engine.forward(&mut kv, &[lane], &[t], &step)?.logits;
    }
    Ok(out)
}
