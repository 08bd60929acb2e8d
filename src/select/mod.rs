//! Token selection: which cached tokens each KV head reads.
//!
//! Every method produces a [`Selection`] for one (sequence, layer): per KV head, strictly
//! ascending token indices, in CSR form over heads. Sparse attention consumes it, and
//! selections compose by [`Selection::union`].
//!
//! - [`streaming`] (StreamingLLM sinks + window) and [`lambda`] (LM-Infinite's Λ-mask),
//!   with [`window_pages_to_evict`] for caches that drop what a window no longer reads;
//! - [`page_bounds`] (Quest): pages ranked by an upper bound of the query's logits, kept
//!   to a token budget, scored by [`page_scores`];
//! - [`cluster`]: K-means clusters of keys and centroid retrieval (Squeezed Attention),
//!   by threshold or token budget, flat or through a coarse level;
//! - [`gemfilter`]: one-shot prompt filtering from an early layer (GemFilter) and
//!   observation-window scoring (SnapKV);
//! - [`expand_spans`] and `topk=`: retrieved tokens grown into spans of their neighbours,
//!   and position-free top-k over raw keys (ReAttention);
//! - [`top_k`]: the linear-time ranking the methods share;
//! - [`Policy`]: per-layer and per-head compositions of these, with a text form
//!   (`sinks=4,window=1024,pages=2048;layers=0-1:dense`). Running a policy on a cache
//!   (`Policy::select`, decode under a policy, cluster index sets) is the runtime layer's.

pub mod cluster;
pub mod gemfilter;
mod keys;
mod pages;
mod policy;
mod policy_check;
mod policy_text;
mod selection;
mod spans;
mod topk;
mod window;

#[cfg(test)]
mod fault_tests;

pub use cluster::{ClusterBuild, ClusterSizing, DEFAULT_CLUSTER_SIZE};
pub(crate) use keys::read_query;
pub use keys::KeySource;
pub use pages::{page_bounds, page_scores, page_scores_into, pages_to_keep, PageBoundsConfig};
pub(crate) use pages::{score_sequence, SeqPageScores};
pub use policy::{ClusterRank, HeadOverride, LayerOverride, Policy, PositionKind, Spec, HIER_OPEN_MULTIPLE};
pub(crate) use selection::merge_union;
pub use selection::{Selection, SelectionStats};
pub use spans::{expand_spans, span_range};
pub(crate) use spans::{hits_to_tokens, ranked_top, raw_scores, topk_tokens};
pub use topk::top_k;
pub(crate) use window::first_and_last;
pub use window::{lambda, streaming, window_pages_to_evict};
