//! K-means clustering of keys and centroid retrieval (Squeezed Attention).
//!
//! Per (layer, KV head), the keys of a fixed context are clustered in normalised space
//! (cosine) by k-means++ and Lloyd iterations ([`kmeans`]); each cluster keeps the mean of
//! its members' raw keys, its size and its member list. At decode time a query scores the
//! centroids, each cluster gets an estimate of the attention its keys receive, and the
//! clusters above a threshold, or the best ones up to a token budget, become a
//! [`Selection`](crate::Selection) ([`ClusterIndex::retrieve`]). A coarse K-means over the
//! fine centroids lets a lookup score only the children of promising coarse clusters
//! ([`ClusterIndex::retrieve_hierarchical`]), so its cost follows what is kept rather than
//! the context length.
//!
//! - [`kmeans`], [`kmeans_from_centroids`], [`seed_plus_plus`]: one head's clustering
//!   (definitions of the normalised space, inertia, seeding and repair are in their docs);
//! - [`ClusterIndex`]: every head of one (sequence, layer), built from a cache's pages or a
//!   key tensor, updated by [`ClusterIndex::assign_new`], saved to and loaded from a
//!   checksummed safetensors file ([`ClusterIndex::save`], [`ClusterIndex::load`]);
//! - [`Retrieve`], [`CoarseRetrieve`], [`Retrieval`], [`RetrievalStats`]: lookups and their
//!   cost in centroid evaluations;
//! - [`calibrate`]: thresholds that keep a target fraction of keys on calibration queries.
//!
//! Tokens past [`ClusterIndex::clustered_len`] (the excluded observation window, or tokens
//! that arrived after the last update) are in no cluster: union a window selection
//! ([`crate::select::streaming`]) to read them.

mod build;
mod calibrate;
mod file;
mod index;
mod keys;
mod kmeans;
mod retrieve;
mod rng;

pub use crate::select::KeySource;
pub use build::{ClusterBuild, ClusterSizing, DEFAULT_CLUSTER_SIZE, SET_MAX_ITER};
pub use calibrate::{calibrate, Thresholds};
pub use index::{ClusterConfig, ClusterIndex, CoarseLevel};
pub use kmeans::{kmeans, kmeans_from_centroids, seed_plus_plus, ClusterCount, Clustering, KMeansConfig};
pub use retrieve::{CoarseRetrieve, Retrieval, RetrievalStats, Retrieve};
pub use rng::SplitMix64;
