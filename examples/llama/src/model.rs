//! The Llama architecture: configuration and weights read from a GGUF file, dequantised
//! to f32 once at load.
//!
//! GGUF llama files store the Q and K projections with their output rows permuted so that
//! RoPE rotates adjacent channel pairs (llama.cpp's convention), which is kvsieve's
//! [`RopeStyle::AdjacentPairs`]; the weights are used as stored.

use std::path::Path;

use kvsieve::attention::{RopeConfig, RopeStyle};

use crate::gguf::{Gguf, GgufError};
use crate::matmul::Matrix;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub num_layers: usize,
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Channels of each head that RoPE rotates.
    pub rope_dim: usize,
    /// Training context length.
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config, GgufError> {
        let arch = g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
        if arch != "llama" {
            return Err(GgufError(format!("general.architecture {arch:?}: only \"llama\" is supported")));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let d_model = g.u64(&key("embedding_length"))? as usize;
        let num_heads = g.u64(&key("attention.head_count"))? as usize;
        let num_kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(v) => {
                v.as_u64().ok_or_else(|| GgufError("attention.head_count_kv is not an integer".into()))? as usize
            }
            None => num_heads,
        };
        if num_heads == 0
            || !d_model.is_multiple_of(num_heads)
            || num_kv_heads == 0
            || !num_heads.is_multiple_of(num_kv_heads)
        {
            return Err(GgufError(format!(
                "heads: {num_heads} query heads, {num_kv_heads} KV heads, embedding {d_model}"
            )));
        }
        let head_dim = d_model / num_heads;
        let vocab_size = match g.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(0, |a| a.len()),
        };
        Ok(Config {
            num_layers: g.u64(&key("block_count"))? as usize,
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
            d_ff: g.u64(&key("feed_forward_length"))? as usize,
            vocab_size,
            rms_eps: g.f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            rope_dim: g.get(&key("rope.dimension_count")).and_then(|v| v.as_u64()).map_or(head_dim, |v| v as usize),
            context_length: g.get(&key("context_length")).and_then(|v| v.as_u64()).unwrap_or(0) as usize,
        })
    }

    /// RoPE as the file defines it: adjacent pairs (GGUF order), the file's theta.
    pub fn rope(&self) -> RopeConfig {
        RopeConfig::new(self.rope_theta, RopeStyle::AdjacentPairs).with_rotary_dim(self.rope_dim)
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

pub struct Model {
    pub cfg: Config,
    /// `[vocab, d_model]`.
    pub tok_embd: Matrix,
    pub layers: Vec<Layer>,
    pub out_norm: Vec<f32>,
    /// The output projection; `None` when the file ties it to the token embedding.
    pub output: Option<Matrix>,
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Matrix, GgufError> {
    let t = g.tensor(name).ok_or_else(|| GgufError(format!("tensor {name} is missing")))?;
    if t.dims != [cols as u64, rows as u64] {
        return Err(GgufError(format!("tensor {name}: expected dims [{cols}, {rows}], got {:?}", t.dims)));
    }
    Ok(Matrix::new(rows, cols, g.tensor_f32(name)?))
}

fn vector(g: &Gguf, name: &str, n: usize) -> Result<Vec<f32>, GgufError> {
    let v = g.tensor_f32(name)?;
    if v.len() != n {
        return Err(GgufError(format!("tensor {name}: expected {n} elements, got {}", v.len())));
    }
    Ok(v)
}

impl Model {
    pub fn load(g: &Gguf) -> Result<Model, GgufError> {
        let cfg = Config::from_gguf(g)?;
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let kvd = cfg.num_kv_heads * hd;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let n = |s: &str| format!("blk.{l}.{s}.weight");
                Ok(Layer {
                    attn_norm: vector(g, &n("attn_norm"), d)?,
                    wq: matrix(g, &n("attn_q"), cfg.num_heads * hd, d)?,
                    wk: matrix(g, &n("attn_k"), kvd, d)?,
                    wv: matrix(g, &n("attn_v"), kvd, d)?,
                    wo: matrix(g, &n("attn_output"), d, cfg.num_heads * hd)?,
                    ffn_norm: vector(g, &n("ffn_norm"), d)?,
                    w_gate: matrix(g, &n("ffn_gate"), cfg.d_ff, d)?,
                    w_up: matrix(g, &n("ffn_up"), cfg.d_ff, d)?,
                    w_down: matrix(g, &n("ffn_down"), d, cfg.d_ff)?,
                })
            })
            .collect::<Result<Vec<_>, GgufError>>()?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(matrix(g, "output.weight", cfg.vocab_size, d)?),
            None => None,
        };
        Ok(Model {
            tok_embd: matrix(g, "token_embd.weight", cfg.vocab_size, d)?,
            layers,
            out_norm: vector(g, "output_norm.weight", d)?,
            output,
            cfg,
        })
    }

    pub fn open(path: &Path) -> Result<(Model, crate::tokenizer::Tokenizer), GgufError> {
        let g = Gguf::open(path)?;
        let tok = crate::tokenizer::Tokenizer::from_gguf(&g)?;
        Ok((Model::load(&g)?, tok))
    }

    /// The matrix producing logits (the token embedding when tied).
    pub fn lm_head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }
}
