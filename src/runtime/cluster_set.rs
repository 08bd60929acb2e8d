//! [`ClusterIndexSet`]: the cluster indexes that a policy with `clusters=` reads, one per
//! (sequence, layer), owned by the engine and passed to
//! [`KvCache::decode_with_clusters`](crate::KvCache::decode_with_clusters).
//!
//! Lifecycle and staleness rule:
//! 1. after a sequence's prefill, [`ClusterIndexSet::build`] clusters the keys of every
//!    layer whose policy uses `clusters=`, leaving out the trailing window the layer's
//!    cluster heads read anyway (the smallest `window=` among them);
//! 2. as tokens are appended, the index does not cover them: retrieval always adds every
//!    token past the index's [`ClusterIndex::clustered_len`] to the selection, so nothing
//!    new is missed, but the uncovered tail grows; [`ClusterIndexSet::update`] assigns the
//!    tokens that have left the window to their nearest centroid (centroids stay put), so
//!    after an update the tail is exactly the window again;
//! 3. when a sequence is truncated or compacted, its indexes no longer match it: decoding
//!    then fails, naming the index; build again. [`ClusterIndexSet::remove_sequence`] drops
//!    a freed sequence's indexes.
//!
//! Which keys an index holds follows the cache it was built from ([`IndexedKeys`]):
//! - a cache of post-RoPE keys: the keys as stored; decode scores the query after RoPE at
//!   its real position, so estimates are the real logits (positions `original`);
//! - a cache of pre-RoPE keys (remapped positions): the raw, unrotated keys; decode with
//!   `positions=capped,max_distance=M` scores the query rotated to position `M`, which is
//!   exactly the logit attention gives a token at a capped distance (every token at least
//!   `M` back, so every retrieved token when `window >= M`, LM-Infinite's usual setting);
//!   with `positions=contiguous` it scores the raw query, position-free (ReAttention's
//!   rule: retrieved tokens are renumbered anyway). Original positions cannot be scored
//!   against raw keys: build from a twin cache of post-RoPE keys instead (same sequence
//!   ids and tokens), and decode scores the query at its real position.

use std::collections::BTreeMap;

use crate::config::KeyRope;
use crate::error::{Error, Result};
use crate::kv::{KvCache, SeqId};
use crate::select::cluster::{ClusterIndex, KeySource};
use crate::select::Policy;
use crate::tensor::TensorView;

/// The keys an index of a [`ClusterIndexSet`] clusters (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexedKeys {
    /// Keys after RoPE at their real positions (built from a post-RoPE cache).
    PostRope,
    /// Raw keys before RoPE (built from a pre-RoPE cache); scored for capped or contiguous
    /// positions.
    PreRope,
}

/// Run `f` on the keys of (`seq`, `layer`) as an index of `cache` clusters them: in place
/// for post-RoPE keys, as an f32 copy of the raw keys for pre-RoPE ones.
fn with_layer_keys<T>(
    cache: &KvCache,
    seq: SeqId,
    layer: usize,
    f: impl FnOnce(KeySource<'_>) -> Result<T>,
) -> Result<T> {
    let c = cache.config();
    if c.key_rope == KeyRope::PostRope {
        return f(KeySource::Cache { cache, seq, layer });
    }
    let keys = cache.read_keys(seq, layer)?;
    let n = keys.len() / (c.num_kv_heads * c.head_dim);
    let view = TensorView::new(&keys, &[n, c.num_kv_heads, c.head_dim])?;
    f(KeySource::Tensor(&view))
}

fn frame_of(cache: &KvCache) -> IndexedKeys {
    match cache.config().key_rope {
        KeyRope::PostRope => IndexedKeys::PostRope,
        KeyRope::PreRope => IndexedKeys::PreRope,
    }
}

/// Cluster indexes keyed by (sequence, layer); see the module docs for when to build and
/// update them.
#[derive(Debug, Clone, Default)]
pub struct ClusterIndexSet {
    indexes: BTreeMap<(SeqId, usize), (ClusterIndex, IndexedKeys)>,
    seed: u64,
}

impl ClusterIndexSet {
    /// An empty set; indexes are seeded with 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set whose indexes use k-means++ seed `seed`.
    pub fn with_seed(seed: u64) -> Self {
        ClusterIndexSet { indexes: BTreeMap::new(), seed }
    }

    /// (Re)build the indexes of `seq` for every layer where `policy` uses `clusters=`,
    /// from the keys in `cache` (post-RoPE keys as stored, or the raw keys of a pre-RoPE
    /// cache: see the module docs). Replaces that sequence's indexes only when every layer
    /// succeeds. Returns the number of layers indexed (0 when the policy has no
    /// `clusters=`).
    ///
    /// Errors: the policy fails validation for the cache's shape; an unknown or empty
    /// sequence; NaN or infinite keys.
    pub fn build(&mut self, cache: &KvCache, seq: SeqId, policy: &Policy) -> Result<usize> {
        let c = cache.config();
        policy.validate(c.num_layers, c.num_kv_heads)?;
        let n = cache.seq_len(seq)?;
        let mut built = crate::alloc::vec_with_capacity(c.num_layers, "cluster indexes")?;
        for layer in 0..c.num_layers {
            if let Some((plan, exclude)) = policy.cluster_plan(layer, c.num_kv_heads) {
                let cfg = plan.config(n, exclude, self.seed)?;
                built.push((layer, with_layer_keys(cache, seq, layer, |src| ClusterIndex::build(src, &cfg))?));
            }
        }
        let count = built.len();
        let frame = frame_of(cache);
        self.indexes.retain(|&(s, _), _| s != seq);
        for (layer, index) in built {
            self.indexes.insert((seq, layer), (index, frame));
        }
        Ok(count)
    }

    /// Assign the tokens of `seq` appended since its indexes were built or updated, and
    /// that have left the excluded window, to their nearest centroids
    /// ([`ClusterIndex::assign_new`]), in every layer. All layers or none: on error the set is
    /// unchanged. Returns the tokens assigned per head, summed over layers.
    ///
    /// Errors: an unknown sequence; a sequence shorter than an index covers (truncated or
    /// compacted: build again); a cache of another shape, or storing keys in the other
    /// frame (before RoPE for an index of post-RoPE keys, or the reverse).
    pub fn update(&mut self, cache: &KvCache, seq: SeqId) -> Result<usize> {
        cache.seq_len(seq)?;
        let frame = frame_of(cache);
        let mut fresh = crate::alloc::vec_with_capacity(self.indexes.len(), "cluster indexes")?;
        let mut total = 0usize;
        for (&(_, layer), (index, keys)) in self.indexes.range((seq, 0)..=(seq, usize::MAX)) {
            if *keys != frame {
                return Err(Error::invalid(
                    "cache",
                    format!(
                        "a cache storing keys {} (as the index of sequence {seq} at layer {layer} was built from)",
                        frame_text(*keys)
                    ),
                ));
            }
            let mut next = index.try_clone()?;
            total += with_layer_keys(cache, seq, layer, |src| next.assign_new(src))?;
            fresh.push((layer, next));
        }
        for (layer, index) in fresh {
            self.indexes.insert((seq, layer), (index, frame));
        }
        Ok(total)
    }

    /// Put an index made elsewhere (for instance [`ClusterIndex::load`]) for (`seq`,
    /// `layer`), clustering keys of the given frame; returns the one it replaces.
    pub fn insert(&mut self, seq: SeqId, layer: usize, index: ClusterIndex, keys: IndexedKeys) -> Option<ClusterIndex> {
        self.indexes.insert((seq, layer), (index, keys)).map(|e| e.0)
    }

    /// The index of (`seq`, `layer`), if built.
    pub fn get(&self, seq: SeqId, layer: usize) -> Option<&ClusterIndex> {
        self.indexes.get(&(seq, layer)).map(|e| &e.0)
    }

    /// Which keys the index of (`seq`, `layer`) clusters, if built.
    pub fn indexed_keys(&self, seq: SeqId, layer: usize) -> Option<IndexedKeys> {
        self.indexes.get(&(seq, layer)).map(|e| e.1)
    }

    /// Drop every index of `seq` (a freed sequence); returns how many there were.
    pub fn remove_sequence(&mut self, seq: SeqId) -> usize {
        let before = self.indexes.len();
        self.indexes.retain(|&(s, _), _| s != seq);
        before - self.indexes.len()
    }

    /// Indexes held, over all sequences and layers.
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    /// The (sequence, layer) pairs indexed, in order.
    pub fn keys(&self) -> impl Iterator<Item = (SeqId, usize)> + '_ {
        self.indexes.keys().copied()
    }
}

/// How messages name a key frame.
pub(crate) fn frame_text(k: IndexedKeys) -> &'static str {
    match k {
        IndexedKeys::PostRope => "after RoPE",
        IndexedKeys::PreRope => "before RoPE",
    }
}
