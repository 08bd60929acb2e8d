//! The index options of a policy's `clusters=` spec ([`ClusterBuild`]) and the index
//! configuration they give for a sequence.

use crate::error::{Error, Result};
use crate::select::cluster::{ClusterConfig, ClusterCount};

/// Tokens per fine cluster when a `clusters=` spec gives neither `clusters_k=` nor
/// `cluster_size=`.
pub const DEFAULT_CLUSTER_SIZE: usize = 16;

/// Lloyd iterations of the indexes built from a `clusters=` spec.
pub const SET_MAX_ITER: usize = 10;

/// How many fine clusters a layer's index gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterSizing {
    /// This many per KV head (`clusters_k=`), at most one per token clustered.
    Count(usize),
    /// One per this many tokens clustered, rounded up (`cluster_size=`).
    TokensPerCluster(usize),
}

/// The index options of a `clusters=` spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterBuild {
    pub count: ClusterSizing,
    /// Coarse clusters per head (`hier=`), at most the fine clusters; `None`: flat lookup.
    pub coarse: Option<usize>,
}

impl ClusterBuild {
    /// The index configuration for a sequence of `n` tokens leaving out the last
    /// `exclude_window` (reduced so that at least one token is clustered).
    pub fn config(&self, n: usize, exclude_window: usize, seed: u64) -> Result<ClusterConfig> {
        if n == 0 {
            return Err(Error::invalid("seq", "a sequence holding tokens to cluster (it is empty: prefill first)"));
        }
        let exclude = exclude_window.min(n - 1);
        let m = n - exclude;
        let k = match self.count {
            ClusterSizing::Count(k) => k.min(m),
            ClusterSizing::TokensPerCluster(s) => m.div_ceil(s.max(1)),
        }
        .max(1);
        let mut cfg = ClusterConfig::new(ClusterCount::Absolute(k))
            .with_exclude_window(exclude)
            .with_seed(seed)
            .with_max_iter(SET_MAX_ITER);
        if let Some(c) = self.coarse {
            cfg = cfg.with_coarse(ClusterCount::Absolute(c.clamp(1, k)));
        }
        Ok(cfg)
    }
}
