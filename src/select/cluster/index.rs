//! [`ClusterIndex`]: the K-means clusterings of every KV head of one (sequence, layer),
//! optionally with a coarse level over the fine centroids, kept up to date as tokens are
//! appended.

use crate::alloc::{collect_n, copy_of, mul, reserve, vec_with_capacity, zeroed_vec};
use crate::cpu::assign::{nearest, PackedCentroids};
use crate::error::{Error, Result};
use crate::select::cluster::keys::{with_keys, KeyRows};
use crate::select::cluster::kmeans::{
    cluster_normalized, grow_radii, members_csr, normalize_rows, ClusterCount, Clustering,
};
use crate::select::KeySource;

/// Mixed into the seed of the coarse level so it draws differently from the fine one.
const COARSE_SEED_SALT: u64 = 0xC0A2_5E5E_ED00_0001;

/// Options of [`ClusterIndex::build`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterConfig {
    /// Fine clusters per KV head: absolute, or a fraction of the tokens clustered.
    pub clusters: ClusterCount,
    /// Leave the last `exclude_window` tokens out (the observation window that a local
    /// window selection reads anyway). The same trailing window stays out after
    /// [`ClusterIndex::assign_new`].
    pub exclude_window: usize,
    /// Lloyd iterations at most (fine and coarse). Default 20.
    pub max_iter: usize,
    /// k-means++ seed; every head uses it, the coarse level uses it xor a fixed salt.
    pub seed: u64,
    /// Coarse clusters per head over the fine centroids (absolute, or a fraction of the
    /// fine clusters), for [`ClusterIndex::retrieve_hierarchical`]. `None`: no coarse level.
    pub coarse: Option<ClusterCount>,
}

impl ClusterConfig {
    pub fn new(clusters: ClusterCount) -> Self {
        ClusterConfig { clusters, exclude_window: 0, max_iter: 20, seed: 0, coarse: None }
    }

    /// For a context of `n` tokens: the tokens clustered (`n` less the excluded window),
    /// the fine cluster count and the coarse one, or an error naming the parameter.
    pub(crate) fn counts(&self, n: usize) -> Result<(usize, usize, Option<usize>)> {
        if n == 0 {
            return Err(Error::invalid("keys", "a non-empty context (the sequence holds no tokens)"));
        }
        if self.exclude_window >= n {
            return Err(Error::invalid(
                "exclude_window",
                format!(
                    "fewer than the {n} tokens of the context, so that some are clustered, got {}",
                    self.exclude_window
                ),
            ));
        }
        let m = n - self.exclude_window;
        let k = self.clusters.resolve(m, "clusters")?;
        let k1 = self.coarse.map(|c| c.resolve(k, "coarse")).transpose()?;
        Ok((m, k, k1))
    }
    pub fn with_exclude_window(mut self, w: usize) -> Self {
        self.exclude_window = w;
        self
    }
    pub fn with_max_iter(mut self, it: usize) -> Self {
        self.max_iter = it;
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn with_coarse(mut self, coarse: ClusterCount) -> Self {
        self.coarse = Some(coarse);
        self
    }
}

/// The coarse level of one head: a K-means over the fine centroids.
///
/// A coarse cluster's children are fine cluster ids (ascending); its size is the sum of its
/// children's sizes, and its centroid (what queries are scored against) is the mean of the
/// raw keys beneath it: the size-weighted mean of its children's raw centroids. The coarse
/// K-means itself assigns the fine raw centroids by cosine, unweighted.
#[derive(Debug, Clone, PartialEq)]
pub struct CoarseLevel {
    pub(crate) centroids: Vec<f32>,
    pub(crate) sizes: Vec<u32>,
    pub(crate) child_offsets: Vec<u32>,
    pub(crate) children: Vec<u32>,
}

impl CoarseLevel {
    pub fn num_clusters(&self) -> usize {
        self.sizes.len()
    }
    /// Size-weighted means of the children's raw centroids, `[num_clusters][head_dim]`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Tokens beneath each coarse cluster.
    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }
    /// CSR offsets into [`CoarseLevel::all_children`].
    pub fn child_offsets(&self) -> &[u32] {
        &self.child_offsets
    }
    pub fn all_children(&self) -> &[u32] {
        &self.children
    }
    /// Fine clusters (ascending) under coarse cluster `c`.
    pub fn children(&self, c: usize) -> &[u32] {
        &self.children[self.child_offsets[c] as usize..self.child_offsets[c + 1] as usize]
    }

    /// Sizes and centroids from the fine level (after the fine sizes changed).
    fn refresh(&mut self, fine: &Clustering) {
        let d = fine.d;
        for c in 0..self.sizes.len() {
            let kids = &self.children[self.child_offsets[c] as usize..self.child_offsets[c + 1] as usize];
            let total: u64 = kids.iter().map(|&f| fine.sizes[f as usize] as u64).sum();
            let mut acc = vec![0f64; d];
            for &f in kids {
                let w = fine.sizes[f as usize] as f64;
                for (a, &v) in acc.iter_mut().zip(fine.centroid(f as usize)) {
                    *a += w * v as f64;
                }
            }
            self.sizes[c] = total as u32;
            for (o, a) in self.centroids[c * d..(c + 1) * d].iter_mut().zip(acc) {
                *o = if total > 0 { (a / total as f64) as f32 } else { 0.0 };
            }
        }
    }

    pub(crate) fn build(fine: &Clustering, k1: usize, seed: u64, max_iter: usize) -> Result<Self> {
        let d = fine.d;
        let (x, xsq) = normalize_rows(&fine.centroids, d)?;
        let cl = cluster_normalized(&fine.centroids, &x, &xsq, d, k1, seed ^ COARSE_SEED_SALT, max_iter)?;
        let mut level = CoarseLevel {
            centroids: zeroed_vec(mul(k1, d, "coarse")?, "coarse centroids")?,
            sizes: zeroed_vec(k1, "coarse sizes")?,
            child_offsets: cl.member_offsets,
            children: cl.members,
        };
        level.refresh(fine);
        Ok(level)
    }

    fn try_clone(&self) -> Result<Self> {
        Ok(CoarseLevel {
            centroids: copy_of(&self.centroids, "coarse centroids")?,
            sizes: copy_of(&self.sizes, "coarse sizes")?,
            child_offsets: copy_of(&self.child_offsets, "coarse child offsets")?,
            children: copy_of(&self.children, "coarse children")?,
        })
    }
}

/// One head's lists after [`ClusterIndex::assign_new`], made before any is put in place.
struct Assigned {
    sizes: Vec<u32>,
    offsets: Vec<u32>,
    members: Vec<u32>,
    radii: Option<Vec<f32>>,
    assignment: Vec<u32>,
}

/// K-means clusters of the keys of one (sequence, layer), every KV head, for centroid
/// retrieval (Squeezed Attention).
///
/// Tokens `0..clustered_len()` are clustered; the rest (`clustered_len()..seq_len()`, the
/// excluded window) are in no cluster and are never returned by retrieval: union a window
/// selection for them.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterIndex {
    pub(crate) config: ClusterConfig,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) seq_len_at_build: usize,
    pub(crate) seq_len: usize,
    pub(crate) clustered_len: usize,
    pub(crate) heads: Vec<Clustering>,
    /// One per head, or empty when the index has no coarse level.
    pub(crate) coarse: Vec<CoarseLevel>,
}

impl ClusterIndex {
    /// Cluster every KV head of the keys in `src` (a cache's pages, read in place, or a
    /// key tensor `[n, num_kv_heads, head_dim]`).
    ///
    /// Errors: an empty context; `exclude_window` leaving no token; a cluster count of 0 or
    /// above the tokens clustered; a coarse count of 0 or above the fine clusters; a NaN or
    /// infinite key (the message names the token and head); a cache storing keys before
    /// RoPE; a bad `head_dim`.
    pub fn build(src: KeySource<'_>, cfg: &ClusterConfig) -> Result<Self> {
        with_keys(src, |keys| Self::build_from(keys, cfg))
    }

    fn build_from(keys: &KeyRows<'_>, cfg: &ClusterConfig) -> Result<Self> {
        let n = keys.n;
        let (m, k, k1) = cfg.counts(n)?;
        let d = keys.d;
        let mut heads = vec_with_capacity(keys.hk, "cluster index heads")?;
        let mut coarse = vec_with_capacity(if k1.is_some() { keys.hk } else { 0 }, "cluster index heads")?;
        for h in 0..keys.hk {
            let raw = keys.read(h, 0..m)?;
            let (x, xsq) = normalize_rows(&raw, d)?;
            let fine = cluster_normalized(&raw, &x, &xsq, d, k, cfg.seed, cfg.max_iter)?;
            if let Some(k1) = k1 {
                coarse.push(CoarseLevel::build(&fine, k1, cfg.seed, cfg.max_iter)?);
            }
            heads.push(fine);
        }
        Ok(ClusterIndex {
            config: *cfg,
            num_kv_heads: keys.hk,
            head_dim: d,
            seq_len_at_build: n,
            seq_len: n,
            clustered_len: m,
            heads,
            coarse,
        })
    }

    /// Assign the keys that arrived since the index was built or last updated (tokens
    /// `clustered_len()..current_len - exclude_window`) to their nearest normalised
    /// centroid, updating sizes, member lists and the coarse level's sizes and centroids.
    /// Returns the number of tokens assigned per head.
    ///
    /// Centroids do not move, so they drift from their members' mean as tokens arrive:
    /// retrieval scores stale centroids (and the raw centroid no longer equals the mean of
    /// the members); cluster radii grow to cover the new members, so the bound of
    /// [`crate::select::cluster::Retrieve::MixedBudget`] stays an upper bound. This is cheap
    /// (one dot product per new key and cluster); call [`ClusterIndex::rebuild`] when many
    /// tokens have arrived.
    ///
    /// Errors: a source with a different `num_kv_heads` or `head_dim`; a sequence shorter
    /// than [`ClusterIndex::seq_len`] (it was truncated or compacted: rebuild); NaN or
    /// infinite keys, or memory running out ([`Error::OutOfMemory`]). On error the index is
    /// unchanged: every head's new lists are made first, then put in place.
    pub fn assign_new(&mut self, src: KeySource<'_>) -> Result<usize> {
        with_keys(src, |keys| {
            self.check_source(keys)?;
            let n = keys.n;
            let end = n.saturating_sub(self.config.exclude_window).max(self.clustered_len);
            let start = self.clustered_len;
            let mut changes = vec_with_capacity(self.num_kv_heads, "cluster index heads")?;
            for h in 0..self.num_kv_heads {
                changes.push(if end > start {
                    Some(self.assigned(h, keys.read(h, start..end)?, start)?)
                } else {
                    None
                });
            }
            for (head, change) in self.heads.iter_mut().zip(&changes) {
                if let Some(c) = change {
                    reserve(&mut head.assignment, c.assignment.len(), "cluster assignment")?;
                }
            }
            // Nothing below allocates more than a head_dim row, nor fails.
            for (h, change) in changes.into_iter().enumerate() {
                let Some(c) = change else { continue };
                let head = &mut self.heads[h];
                head.sizes = c.sizes;
                head.member_offsets = c.offsets;
                head.members = c.members;
                if let Some(r) = c.radii {
                    head.radii = r;
                }
                head.assignment.extend_from_slice(&c.assignment);
                if let Some(level) = self.coarse.get_mut(h) {
                    level.refresh(head);
                }
            }
            self.clustered_len = end;
            self.seq_len = n;
            Ok(end - start)
        })
    }

    /// Head `h`'s lists with the keys `raw` (tokens from `start` on) assigned to their
    /// nearest normalised centroids; the index itself is not touched.
    fn assigned(&self, h: usize, raw: Vec<f32>, start: usize) -> Result<Assigned> {
        let d = self.head_dim;
        let (x, _) = normalize_rows(&raw, d)?;
        let head = &self.heads[h];
        let k = head.sizes.len();
        let count = raw.len() / d;
        let mut a = zeroed_vec::<u32>(count, "cluster assignment")?;
        let mut best = zeroed_vec::<f32>(count, "cluster assignment")?;
        nearest(&x, d, &PackedCentroids::new(&head.centroids_normalized, k, d), &mut a, &mut best);
        let radii = if head.radii.len() == k {
            let mut r = copy_of(&head.radii, "cluster radii")?;
            grow_radii(&mut r, &raw, d, &head.centroids, &a);
            Some(r)
        } else {
            None
        };
        let (new_off, new_mem) = members_csr(&a, k)?;
        let mut members = vec_with_capacity(head.members.len() + a.len(), "cluster members")?;
        let mut offsets = vec_with_capacity(k + 1, "cluster member offsets")?;
        offsets.push(0u32);
        for c in 0..k {
            members.extend_from_slice(head.members(c));
            members.extend(new_mem[new_off[c] as usize..new_off[c + 1] as usize].iter().map(|&i| i + start as u32));
            offsets.push(members.len() as u32);
        }
        let sizes = collect_n(k, offsets.windows(2).map(|w| w[1] - w[0]), "cluster sizes")?;
        Ok(Assigned { sizes, offsets, members, radii, assignment: a })
    }

    /// A copy, or [`Error::OutOfMemory`] (`Clone` aborts when memory runs out).
    pub fn try_clone(&self) -> Result<Self> {
        let mut heads = vec_with_capacity(self.heads.len(), "cluster index heads")?;
        for c in &self.heads {
            heads.push(Clustering {
                d: c.d,
                centroids: copy_of(&c.centroids, "centroids")?,
                centroids_normalized: copy_of(&c.centroids_normalized, "centroids")?,
                sizes: copy_of(&c.sizes, "cluster sizes")?,
                member_offsets: copy_of(&c.member_offsets, "cluster member offsets")?,
                members: copy_of(&c.members, "cluster members")?,
                assignment: copy_of(&c.assignment, "cluster assignment")?,
                inertia: c.inertia,
                inertia_history: copy_of(&c.inertia_history, "inertia history")?,
                iterations: c.iterations,
                converged: c.converged,
                seeds: copy_of(&c.seeds, "k-means++ seeds")?,
                radii: copy_of(&c.radii, "cluster radii")?,
            });
        }
        let mut coarse = vec_with_capacity(self.coarse.len(), "cluster index heads")?;
        for c in &self.coarse {
            coarse.push(c.try_clone()?);
        }
        Ok(ClusterIndex { heads, coarse, ..*self })
    }

    /// Cluster again from scratch with the same configuration over the source's current
    /// tokens (replaces the index only on success).
    pub fn rebuild(&mut self, src: KeySource<'_>) -> Result<()> {
        let cfg = self.config;
        let fresh = with_keys(src, |keys| {
            self.check_source(keys)?;
            Self::build_from(keys, &cfg)
        })?;
        *self = fresh;
        Ok(())
    }

    fn check_source(&self, keys: &KeyRows<'_>) -> Result<()> {
        if keys.hk != self.num_kv_heads || keys.d != self.head_dim {
            return Err(Error::shape(
                "keys",
                format!("num_kv_heads {} and head_dim {} (as the index)", self.num_kv_heads, self.head_dim),
                format!("num_kv_heads {} and head_dim {}", keys.hk, keys.d),
            ));
        }
        if keys.n < self.seq_len {
            return Err(Error::invalid(
                "keys",
                format!(
                    "a sequence at least as long as when the index was last updated ({} tokens), got {} (truncated or compacted since: rebuild the index)",
                    self.seq_len, keys.n
                ),
            ));
        }
        Ok(())
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Fine clusters per head.
    pub fn num_clusters(&self) -> usize {
        self.heads[0].sizes.len()
    }
    /// Coarse clusters per head (0 without a coarse level).
    pub fn num_coarse_clusters(&self) -> usize {
        self.coarse.first().map_or(0, |c| c.sizes.len())
    }
    /// Sequence length when the index was built.
    pub fn seq_len_at_build(&self) -> usize {
        self.seq_len_at_build
    }
    /// Sequence length when the index was built or last updated by `assign_new`.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    /// Tokens `0..clustered_len()` are in clusters.
    pub fn clustered_len(&self) -> usize {
        self.clustered_len
    }
    /// The clustering of KV head `h`. Panics if `h >= num_kv_heads()`.
    pub fn head(&self, h: usize) -> &Clustering {
        &self.heads[h]
    }
    /// The coarse level of KV head `h`, if the index has one.
    pub fn coarse(&self, h: usize) -> Option<&CoarseLevel> {
        self.coarse.get(h)
    }
}
