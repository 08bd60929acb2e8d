//! kvsieve: paged KV storage, token selection and sparse attention for LLM inference
//! engines, on the CPU (and CUDA behind the `cuda` feature), with Rust, C and Python surfaces.
//!
//! ```
//! use kvsieve::attention::AttentionParams;
//! use kvsieve::{CacheConfig, DType, KvCache, Policy, TensorView, TensorViewMut};
//!
//! # fn main() -> kvsieve::Result<()> {
//! // 1 layer, 2 KV heads, 8 query heads, head_dim 64; pages of 16 tokens, 64 pages, f16.
//! let (kv_heads, q_heads, d) = (2, 8, 64);
//! let mut cache = KvCache::new(CacheConfig::new(1, kv_heads, d, 16, 64).with_dtype(DType::F16))?;
//!
//! // A 300-token prompt: append its slots, then write its keys (after RoPE) and values.
//! let seq = cache.create_sequence();
//! cache.append(seq, 300, None)?;
//! let kv: Vec<f32> = (0..300 * kv_heads * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let rows = TensorView::new(&kv, &[300, kv_heads, d])?;
//! cache.write(seq, 0, 0, &rows, &rows)?;
//!
//! // Decode one query token: every cached token, then only what a policy selects
//! // (the first 4 tokens, the last 64, and the best pages up to 64 more tokens per KV head).
//! let q = vec![0.1f32; q_heads * d];
//! let q = TensorView::new(&q, &[1, q_heads, d])?;
//! let mut out = vec![0f32; q_heads * d];
//! let params = AttentionParams::default();
//! cache.decode(0, &[seq], &q, &mut TensorViewMut::new(&mut out, &[1, q_heads, d])?, None, &params)?;
//!
//! let policy = Policy::parse("sinks=4,window=64,pages=64")?;
//! let mut out = TensorViewMut::new(&mut out, &[1, q_heads, d])?;
//! let selections = cache.decode_with_policy(0, &[seq], &q, &policy, &mut out, None, &params)?;
//! assert!(selections[0].head(0).len() <= 4 + 64 + 64 + 16);
//! # Ok(())
//! # }
//! ```
//!
//! The layers, bottom to top (each uses only the ones below it):
//! - [`error`], [`dtype`], [`tensor`], [`config`]: the base types;
//! - [`cpu`]: the CPU kernels and their run-time instruction-set choice;
//! - [`kv`]: storage: [`KvCache`] (page pool with reference counts, prefix sharing by fork,
//!   eviction, per-page key bounds, CSR page tables) and [`PagedKv`], a validated view over
//!   one layer's paged K/V, owned by kvsieve or by the engine;
//! - [`attention`]: dense and sparse decode and prefill over a `PagedKv`, `merge_states`, RoPE;
//! - [`select`]: [`Selection`]s and the methods that make them (windows, page bounds,
//!   K-means clusters, GemFilter), and [`Policy`], their composition per layer and head;
//! - [`runtime`]: the operations that join them on a cache (`KvCache::decode`, decode and
//!   prefill under a policy, [`ClusterIndexSet`]);
//! - [`backend`]: [`Device`] and, with the `cuda` feature, the same operations on a GPU.
//!
//! The C ABI (`include/kvsieve.h`; `crates/kvsieve-c` builds `libkvsieve.so` and `libkvsieve.a`)
//! and the Python package are separate crates over this one.

pub(crate) mod alloc;
pub mod attention;
pub mod backend;
pub mod config;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod kv;
pub mod runtime;
pub mod select;
pub mod tensor;

pub use backend::Device;
pub use config::{CacheConfig, KeyRope, PageLayout};
pub use dtype::{DType, Element};
pub use error::{Error, ErrorCode, Result};
pub use kv::{KeepTokens, KvCache, MemoryStats, PageTable, PageTableRef, PagedKv, PagedKvLayout, SeqId, SharedKvCache};
pub use runtime::{ClusterIndexSet, PolicySelection};
pub use select::{Policy, Selection};
pub use tensor::{TensorView, TensorViewMut};

/// The library version, `MAJOR.MINOR.PATCH`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use half::{bf16, f16};
