//! Cache-level operations that join storage, attention and selection: decode and prefill
//! directly on a [`KvCache`](crate::KvCache) (dense, sparse, or under a
//! [`Policy`](crate::Policy)), running a policy's selection for a query, eviction of the
//! pages a policy will not read again, and the per-(sequence, layer) cluster indexes that
//! centroid retrieval reads ([`ClusterIndexSet`]).
//!
//! This is the top of the CPU stack: it may use every layer below it (`kv`, `attention`,
//! `select`), and none of them uses it. The operations are methods of the types they act
//! on (`KvCache::decode`, `Policy::select`), defined here.

mod cache_attention;
mod cluster_set;
mod policy_attention;
mod policy_select;

pub use cluster_set::{ClusterIndexSet, IndexedKeys};
pub use policy_select::PolicySelection;

#[cfg(test)]
mod fault_tests;
