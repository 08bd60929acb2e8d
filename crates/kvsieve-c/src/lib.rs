//! libkvsieve: the C API declared in `include/kvsieve.h` and the per-concept headers of
//! `include/kvsieve/`, over the `kvsieve` crate. A thin layer: it checks raw arguments
//! (pointers, DLPack tensor descriptors, enum values), converts them to the core's types,
//! runs the core under a panic guard and turns every failure into a `kvsieve_error_t`.
//!
//! One module per header, holding the functions and types that header declares:
//! `version`, `error`, `tensor`, `cache`, `selection`, `attention`, `policy`, `gemfilter`,
//! `cluster` (with `cluster_retrieve` and `cluster_set`, the header's retrieval and
//! policy sections), `view` and `cuda` (with `cuda_cache` and `cuda_select`, the device
//! cache and the selection and prefill sections). Helpers: `args` (raw argument checks,
//! versioned structs) and `params` (the attention parameter structs and their conversion).
//!
//! Rules every entry point follows:
//! - a panic never unwinds into C; it becomes a `KVSIEVE_ERROR_INTERNAL` error;
//! - every pointer is checked (NULL gives `KVSIEVE_ERROR_NULL_POINTER` naming the parameter)
//!   and every shape before anything changes; out-parameters are written only on success;
//! - a buffer kvsieve writes never overlaps one the same call reads (an error otherwise);
//! - the cache handle holds its [`kvsieve::KvCache`] behind a reader-writer lock: queries,
//!   selection and attention take the read lock and run concurrently, changes (including
//!   eviction for a policy and compaction) take the write lock;
//! - selection and policy handles are immutable once made, so they need no lock.
//!
//! Every public `#[repr(C)]` struct has its size and field offsets asserted at compile
//! time (on 64-bit targets), and the header's layout is compared with these by the tests.
//! The structs a caller fills or receives (all but the DLPack-layout tensor descriptor and
//! the device-memory key-bound entries) are versioned: they begin with `size_t
//! struct_size`, which the header's `static inline` initialisers set to the caller's
//! `sizeof`, and the library reads and writes each through `args::read_versioned` and
//! `args::VersionedOut` only as far as that size reaches (see `args::Versioned`).
//!
//! The crate builds `libkvsieve.so` and `libkvsieve.a` only (no rlib): Rust programs use the
//! `kvsieve` crate. Modules name their siblings with `super::`, so that the tests can
//! compile this file as a module of their own (`#[path = "../src/lib.rs"] mod capi;`) to
//! reach the Rust definitions.

// One module per header (cluster.h and cuda.h span three each).
mod attention;
mod cache;
mod cluster;
mod cluster_retrieve;
mod cluster_set;
mod cuda;
mod cuda_cache;
mod cuda_select;
mod error;
mod gemfilter;
mod policy;
mod selection;
mod tensor;
mod version;
mod view;

// Helpers.
mod args;
mod params;

pub use attention::{
    kvsieve_apply_rope, kvsieve_cache_decode, kvsieve_cache_decode_sparse, kvsieve_cache_prefill,
    kvsieve_cache_prefill_sparse, kvsieve_merge_states, kvsieve_streaming_window_t,
};
pub use cache::{
    kvsieve_cache_append, kvsieve_cache_compact, kvsieve_cache_config_default, kvsieve_cache_config_t,
    kvsieve_cache_create_sequence, kvsieve_cache_evict_pages, kvsieve_cache_fork, kvsieve_cache_free,
    kvsieve_cache_free_sequence, kvsieve_cache_get_config, kvsieve_cache_new, kvsieve_cache_page_key_bounds,
    kvsieve_cache_page_table, kvsieve_cache_page_table_size, kvsieve_cache_positions, kvsieve_cache_read,
    kvsieve_cache_seq_len, kvsieve_cache_stats, kvsieve_cache_stats_t, kvsieve_cache_t, kvsieve_cache_truncate,
    kvsieve_cache_write, kvsieve_cache_write_slots, kvsieve_key_source_t, KEEP_ALL, KEEP_PER_HEAD, KEEP_PER_LAYER,
};
pub use cluster::{
    cluster_index_from_handle, cluster_index_into_handle, kvsieve_cluster_config_default, kvsieve_cluster_config_t,
    kvsieve_cluster_index_assign_new, kvsieve_cluster_index_build, kvsieve_cluster_index_centroids,
    kvsieve_cluster_index_centroids_normalized, kvsieve_cluster_index_clustered_len,
    kvsieve_cluster_index_coarse_centroids, kvsieve_cluster_index_coarse_child_offsets,
    kvsieve_cluster_index_coarse_children, kvsieve_cluster_index_coarse_sizes, kvsieve_cluster_index_free,
    kvsieve_cluster_index_get_config, kvsieve_cluster_index_head_dim, kvsieve_cluster_index_load,
    kvsieve_cluster_index_load_for, kvsieve_cluster_index_member_offsets, kvsieve_cluster_index_members,
    kvsieve_cluster_index_num_clusters, kvsieve_cluster_index_num_coarse_clusters, kvsieve_cluster_index_num_kv_heads,
    kvsieve_cluster_index_radii, kvsieve_cluster_index_rebuild, kvsieve_cluster_index_save,
    kvsieve_cluster_index_seq_len, kvsieve_cluster_index_seq_len_at_build, kvsieve_cluster_index_sizes,
    kvsieve_cluster_index_t,
};
pub use cluster_retrieve::{
    kvsieve_cluster_index_calibrate, kvsieve_cluster_index_estimates, kvsieve_cluster_index_retrieve,
    kvsieve_retrieve_config_default, kvsieve_retrieve_config_t, kvsieve_retrieve_stats_t, COARSE_BUDGET,
    COARSE_BUDGET_MULTIPLE, COARSE_THRESHOLD, RETRIEVE_BUDGET, RETRIEVE_BUDGET_MIXED, RETRIEVE_PER_HEAD_THRESHOLD,
    RETRIEVE_THRESHOLD,
};
pub use cluster_set::{
    kvsieve_cache_decode_with_clusters, kvsieve_cluster_set_build, kvsieve_cluster_set_free, kvsieve_cluster_set_info,
    kvsieve_cluster_set_new, kvsieve_cluster_set_remove_sequence, kvsieve_cluster_set_t, kvsieve_cluster_set_update,
};
pub use cuda::{
    kvsieve_cuda_check, kvsieve_cuda_device_count, kvsieve_cuda_merge_states, kvsieve_cuda_paged_append,
    kvsieve_cuda_paged_decode, kvsieve_cuda_paged_decode_sparse, DEVICE_CUDA, DEVICE_CUDA_MANAGED,
};
pub use cuda_cache::{
    kvsieve_cuda_cache_append, kvsieve_cuda_cache_compact, kvsieve_cuda_cache_create_sequence,
    kvsieve_cuda_cache_evict_pages, kvsieve_cuda_cache_fork, kvsieve_cuda_cache_free, kvsieve_cuda_cache_free_sequence,
    kvsieve_cuda_cache_layer_view, kvsieve_cuda_cache_new, kvsieve_cuda_cache_seq_len, kvsieve_cuda_cache_t,
    kvsieve_cuda_cache_truncate, kvsieve_cuda_cache_write, kvsieve_cuda_table_free, kvsieve_cuda_table_t,
};
pub use cuda_select::{
    kvsieve_cuda_cluster_index_build, kvsieve_cuda_cluster_index_free, kvsieve_cuda_cluster_index_info,
    kvsieve_cuda_cluster_index_retrieve, kvsieve_cuda_cluster_index_t, kvsieve_cuda_cluster_index_upload,
    kvsieve_cuda_gemfilter_select, kvsieve_cuda_page_bounds, kvsieve_cuda_paged_prefill,
    kvsieve_cuda_update_key_bounds, kvsieve_key_bounds_entry_t,
};
pub use error::{
    kvsieve_error_code, kvsieve_error_code_name, kvsieve_error_free, kvsieve_error_message, kvsieve_error_parse_offset,
    kvsieve_error_t,
};
pub use gemfilter::{
    kvsieve_avg_pool, kvsieve_gemfilter_calibrate_layers, kvsieve_gemfilter_config_default, kvsieve_gemfilter_config_t,
    kvsieve_gemfilter_scores, kvsieve_gemfilter_select, kvsieve_snapkv, kvsieve_snapkv_config_t,
};
pub use params::{
    kvsieve_attention_params_t, kvsieve_rope_config_t, POSITIONS_CAPPED, POSITIONS_CONTIGUOUS, POSITIONS_ORIGINAL,
};
pub use policy::{
    kvsieve_cache_decode_with_policy, kvsieve_cache_evict_for_policy, kvsieve_cache_prefill_with_policy,
    kvsieve_policy_free, kvsieve_policy_parse, kvsieve_policy_position_mode, kvsieve_policy_select, kvsieve_policy_t,
    kvsieve_policy_to_string, kvsieve_policy_validate,
};
pub use selection::{
    kvsieve_expand_spans, kvsieve_page_bounds_config_t, kvsieve_selection_dense, kvsieve_selection_free,
    kvsieve_selection_from_csr, kvsieve_selection_head, kvsieve_selection_head_indptr, kvsieve_selection_indices,
    kvsieve_selection_intersection, kvsieve_selection_lambda, kvsieve_selection_len, kvsieve_selection_num_kv_heads,
    kvsieve_selection_page_bounds, kvsieve_selection_same_for_all_heads, kvsieve_selection_seq_len,
    kvsieve_selection_stats, kvsieve_selection_stats_t, kvsieve_selection_streaming, kvsieve_selection_t,
    kvsieve_selection_union,
};
pub use tensor::{
    kvsieve_device_t, kvsieve_dtype_t, kvsieve_tensor_t, DEVICE_CPU, DTYPE_CODE_BFLOAT, DTYPE_CODE_FLOAT,
};
pub use version::{kvsieve_isa, kvsieve_version, kvsieve_version_major, kvsieve_version_minor, kvsieve_version_patch};
pub use view::{
    kvsieve_paged_decode, kvsieve_paged_decode_sparse, kvsieve_paged_kv_t, kvsieve_paged_prefill,
    kvsieve_paged_prefill_sparse,
};
