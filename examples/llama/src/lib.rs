//! kvsieve-llama: a small Llama-architecture CPU engine that keeps its KV cache in kvsieve
//! and runs all attention through it, plus the evaluation of kvsieve's selection policies
//! on a real model (SmolLM2-135M-Instruct).
//!
//! - [`gguf`], [`quant`]: reading GGUF files and dequantising tensors;
//! - [`tokenizer`]: byte-level BPE from the file's metadata;
//! - [`model`], [`matmul`]: configuration, weights and the linear layers;
//! - [`engine`]: the forward pass over kvsieve caches;
//! - [`generate`]: prompts, greedy generation and next-token probabilities;
//! - [`tasks`], [`perplexity`], [`sweep`], [`report`]: the evaluation of kvsieve's policies;
//! - [`long`]: passkey retrieval past the training window (dense, Λ-mask, Λ-mask + retrieval).

pub mod engine;
pub mod generate;
pub mod gguf;
pub mod long;
pub mod matmul;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod report;
pub mod sweep;
pub mod tasks;
pub mod text;
pub mod tokenizer;

/// Where scripts/fetch-model.sh leaves the model.
pub fn default_model_path() -> std::path::PathBuf {
    let cache = std::env::var_os("KVSIEVE_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kvsieve")
    });
    cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
