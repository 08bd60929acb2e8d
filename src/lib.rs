//! kvsieve: paged KV storage, token selection and sparse attention for LLM inference
//! engines, on the CPU (and CUDA behind the `cuda` feature), with Rust, C and Python surfaces.
//!
//! The pieces:
//! - [`KvCache`]: kvsieve-owned paged K/V storage (page pool with reference counts,
//!   prefix sharing by fork, eviction, per-page key bounds, CSR page tables);
//! - [`PagedKv`]: a validated view over one layer's paged K/V, owned by kvsieve or by the engine;
//! - [`attention`]: dense decode and prefill over a `PagedKv`, `merge_states`, RoPE;
//! - [`backend`]: [`Device`] and, with the `cuda` feature, the CUDA backend.
//!
//! The C ABI declared in `include/kvsieve.h` is a crate of its own over this one,
//! `crates/kvsieve-c` (`libkvsieve.so`, `libkvsieve.a`).

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
