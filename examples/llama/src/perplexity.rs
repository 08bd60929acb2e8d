//! Perplexity: of a whole text under dense attention (prefill, every row's logits), and of
//! the continuation of a context under a policy (the context prefilled densely, then each
//! evaluated token decoded through the policy's selection).

use kvsieve::Policy;

use crate::engine::{log_prob, Engine, Kv, Lane, Logits, Result, Step};
use crate::generate::PREFILL_CHUNK;
use crate::model::Model;

/// Perplexity of `tokens` (the first token is not predicted): exp of the mean negative log
/// likelihood of tokens 1..n, each given all tokens before it, dense attention.
pub fn perplexity(model: &Model, tokens: &[u32]) -> Result<f64> {
    let mut kv = Kv::new(model, tokens.len(), 16, 1, false)?;
    let seq = kv.create();
    let mut engine = Engine::new(model);
    let policy = Policy::dense();
    let lane = Lane::new(seq, &policy, model.cfg.num_layers);
    let step = Step { logits: Logits::All, ..Step::default() };
    let v = model.cfg.vocab_size;
    let mut nll = 0.0;
    for (ci, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
        let logits = engine.forward(&mut kv, &[lane], chunk, &step)?.logits;
        for (i, row) in logits.chunks(v).enumerate() {
            let next = ci * PREFILL_CHUNK + i + 1;
            if next < tokens.len() {
                nll -= log_prob(row, tokens[next]);
            }
        }
    }
    Ok((nll / (tokens.len() - 1) as f64).exp())
}
