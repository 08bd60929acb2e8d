/**
 * \file kvsieve/cuda.h
 *
 * \brief CUDA: the `kvsieve_cuda_*` entry points, which run on an NVIDIA GPU over device
 * memory on the engine's stream: attention over device views, append and key bounds, a
 * device-resident cache, page-bound selection, centroid retrieval and GemFilter, with
 * conventions of their own, stated below the includes.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_CUDA_H
#define KVSIEVE_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "tensor.h"
#include "cache.h"
#include "selection.h"
#include "attention.h"
#include "view.h"
#include "gemfilter.h"
#include "cluster.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * The `kvsieve_cuda_*` functions run on an NVIDIA GPU (compute capability 8.0 or newer) over
 * device memory the engine owns, on the engine's stream. They exist in every build; a
 * library built without CUDA support, or a machine without a driver or device, answers
 * #KVSIEVE_ERROR_CUDA_UNAVAILABLE with the reason (never a crash).
 *
 * Conventions shared by all of them:
 * - Tensors and ::kvsieve_paged_kv_t descriptors have `device.device_type`
 *   #KVSIEVE_DEVICE_CUDA and `device.device_id` the device ordinal; every pointer in them is
 *   a device address. The descriptors themselves are host structs, read during the call.
 * - `stream` is a `cudaStream_t` / `CUstream` of the device's primary context (the runtime
 *   API's context), passed as `void *`; NULL is the legacy default stream. Work is queued on
 *   it and the call returns without waiting: results are ready when the stream says so.
 * - Descriptors, shapes, dtypes and parameters are checked on the host before anything is
 *   queued (errors name the parameter). Device memory cannot be checked from the host: page
 *   tables, selections and slot mappings must satisfy the documented invariants, and all
 *   memory must stay valid, and not be written by others, until the queued work completes.
 * - Kernel limits: pages float16 or bfloat16, `head_dim` 64 or 128, `page_size` a power of
 *   two, K/V strides multiples of 8 elements and `k`, `v` aligned to 16 bytes; queries and
 *   outputs float32, float16 or bfloat16 with any strides. Others give
 *   #KVSIEVE_ERROR_UNSUPPORTED.
 * - CUDA graphs: decode, sparse decode, append, key-bound updates and merge_states queue
 *   kernels only (no host copy, no synchronisation); page-bound selection and centroid
 *   retrieval do too once their scratch exists (see each function); prefill, GemFilter and
 *   index upload or build copy host data and cannot be captured. Decode needs a workspace that kvsieve allocates per (device,
 *   stream) on first use and grows when a larger call needs it, so run a call of the
 *   largest shape once before capturing. Launch sizes depend only on the host arguments
 *   (`batch`, heads, `max_seq_len`, `max_per_head`, `chunk_size`), so a captured graph stays
 *   valid while the engine rewrites page tables, selections and positions in place.
 *
 * Thread safety: all thread-safe; calls on one stream are ordered by the stream.
 */

/**
 * \brief Number of CUDA devices the driver reports.
 *
 * \param out_count Receives the count (required).
 * \return NULL on success; #KVSIEVE_ERROR_CUDA_UNAVAILABLE (with the reason) when there is no
 * driver or the library was built without CUDA. `*out_count` untouched on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_device_count(size_t *out_count);

/**
 * \brief Check that CUDA device `device_id` can run kvsieve's kernels (driver present, device
 * exists, compute capability 8.0 or newer). Creates the device's context and kvsieve's state
 * for it on first use.
 *
 * \return NULL when usable, otherwise #KVSIEVE_ERROR_CUDA_UNAVAILABLE with the reason
 * (#KVSIEVE_ERROR_INVALID_ARGUMENT for a negative id).
 *
 * Ownership: nothing is retained by the caller. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_check(int32_t device_id);

/**
 * \brief Dense decode on the GPU over engine-owned paged memory: as kvsieve_paged_decode(),
 * with every pointer a device address, queued on `stream`.
 *
 * \param kv Device descriptor (required); its page table and positions are device arrays.
 * \param max_seq_len An upper bound on every sequence's length (sizes the split over chunks;
 *        keep it fixed to replay a captured graph). Tokens past it are not read.
 * \param q Queries `[batch, num_qo_heads, head_dim]` on the device.
 * \param out Output, same shape, on the device; must not overlap the inputs.
 * \param lse Optional: device memory for `batch * num_qo_heads` floats (natural-log LSEs).
 * \param params Optional host struct (NULL = defaults); RoPE at read with every position mode.
 * \param stream `cudaStream_t` as `void *` (NULL = legacy default stream).
 * \return NULL when queued, or an error (owned by the caller); nothing queued on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_paged_decode(const kvsieve_paged_kv_t *kv, size_t max_seq_len, const kvsieve_tensor_t *q,
                                           const kvsieve_tensor_t *out, float *lse,
                                           const kvsieve_attention_params_t *params, void *stream);

/**
 * \brief Sparse decode on the GPU: KV head `h` of sequence `b` reads only the tokens of list
 * `b * num_kv_heads + h` of a device CSR over (sequence, KV head): list `i` is
 * `sel_indices[sel_indptr[i] .. sel_indptr[i + 1]]`, strictly ascending token indices below
 * the sequence's length. The result equals dense attention over exactly those tokens.
 *
 * \param kv Device descriptor (required).
 * \param max_seq_len As for kvsieve_cuda_paged_decode().
 * \param sel_indptr Device array of `batch * num_kv_heads + 1` int32 offsets (required).
 * \param sel_indices Device array of int32 token indices (required).
 * \param max_per_head An upper bound on every list's length.
 * \param q, out, lse, params, stream As for kvsieve_cuda_paged_decode().
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_paged_decode_sparse(const kvsieve_paged_kv_t *kv, size_t max_seq_len,
                                                  const int32_t *sel_indptr, const int32_t *sel_indices,
                                                  size_t max_per_head, const kvsieve_tensor_t *q,
                                                  const kvsieve_tensor_t *out, float *lse,
                                                  const kvsieve_attention_params_t *params, void *stream);

/**
 * \brief Paged append on the GPU (like vLLM's `reshape_and_cache`): write row `i` of `k` and
 * `v` into slot `slot_mapping[i]` (`page * page_size + slot`) of the pages `kv` describes,
 * converting to the page dtype (round to nearest even). Negative slots are skipped (padding).
 * The page table of `kv` is not used; key bounds are not updated.
 *
 * \param kv Device descriptor (required); its pages are written.
 * \param k Keys `[n, num_kv_heads, head_dim]` on the device, float32/float16/bfloat16.
 * \param v Values, same shape.
 * \param slot_mapping Device array of `n` int64 slots, each below `num_pages * page_size` or
 *        negative (required when n > 0).
 * \param stream `cudaStream_t` as `void *`.
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe, provided no other work reads
 * or writes the target slots meanwhile.
 */
kvsieve_error_t *kvsieve_cuda_paged_append(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *k,
                                           const kvsieve_tensor_t *v, const int64_t *slot_mapping, void *stream);

/**
 * \brief merge_states on the GPU: as kvsieve_merge_states(), with device tensors and device
 * LSE arrays (`n * heads` floats each).
 *
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_merge_states(const kvsieve_tensor_t *v_a, const float *lse_a,
                                           const kvsieve_tensor_t *v_b, const float *lse_b,
                                           const kvsieve_tensor_t *out, float *lse_out, void *stream);

/* Device caches ------------------------------------------------------------------------ */

/**
 * \brief kvsieve-owned paged K/V resident on one CUDA device, with the same bookkeeping as
 * ::kvsieve_cache_t (sequences, fork with copy on write, append, write, truncate, page
 * eviction, compaction, exact key bounds) and the same answers. Pages are float16 or
 * bfloat16, page_size a power of two (at most 64 with `track_key_bounds`).
 * kvsieve_cuda_cache_layer_view() describes one layer for a batch of sequences as a device
 * ::kvsieve_paged_kv_t, so kvsieve_cuda_paged_decode(), _decode_sparse(), _prefill(),
 * kvsieve_cuda_page_bounds() (with the view's key bounds) and the other `kvsieve_cuda_*`
 * calls run over it.
 *
 * Every change validates its arguments first (a failed call leaves the cache as it was),
 * runs on kvsieve's stream of the device and returns when its device work is done, so none
 * of them can be captured in a CUDA graph. Order work the engine queues on its own stream
 * after these calls return.
 *
 * Thread safety: calls on one handle are serialised by a mutex.
 */
typedef struct kvsieve_cuda_cache kvsieve_cuda_cache_t;

/** \brief A device page table made by kvsieve_cuda_cache_layer_view(); the descriptor it
 *  filled points into it. Release with kvsieve_cuda_table_free(). */
typedef struct kvsieve_cuda_table kvsieve_cuda_table_t;

/**
 * \brief Create a device cache on CUDA device `device_id`; all pages are allocated up front.
 *
 * \param config As for kvsieve_cache_new() (required); float16 or bfloat16 pages, a power of
 *        two page_size (#KVSIEVE_ERROR_UNSUPPORTED otherwise).
 * \param device_id CUDA device ordinal, >= 0.
 * \param out Receives the cache (required); untouched on failure.
 * \return NULL on success; #KVSIEVE_ERROR_CUDA_UNAVAILABLE without a driver, device or CUDA
 * support; another error for a bad configuration (owned by the caller).
 */
kvsieve_error_t *kvsieve_cuda_cache_new(const kvsieve_cache_config_t *config, int32_t device_id,
                                        kvsieve_cuda_cache_t **out);

/** \brief Free a device cache and its device memory. NULL is ignored. No call on it may be
 *  running and no queued work may still read its pages. */
void kvsieve_cuda_cache_free(kvsieve_cuda_cache_t *cache);

/** \brief A new empty sequence, its id into `*out_seq` (required). */
kvsieve_error_t *kvsieve_cuda_cache_create_sequence(kvsieve_cuda_cache_t *cache, uint64_t *out_seq);

/** \brief Fork `src`: the new sequence shares its pages (copy on write); its id into
 *  `*out_seq` (required). #KVSIEVE_ERROR_UNKNOWN_SEQUENCE for an unknown `src`. */
kvsieve_error_t *kvsieve_cuda_cache_fork(kvsieve_cuda_cache_t *cache, uint64_t src, uint64_t *out_seq);

/** \brief Drop a sequence; pages no other sequence shares go back to the pool. */
kvsieve_error_t *kvsieve_cuda_cache_free_sequence(kvsieve_cuda_cache_t *cache, uint64_t seq);

/** \brief A sequence's length in tokens, into `*out_len` (required). */
kvsieve_error_t *kvsieve_cuda_cache_seq_len(const kvsieve_cuda_cache_t *cache, uint64_t seq, size_t *out_len);

/**
 * \brief Reserve `n` token slots at the end of a sequence, as kvsieve_cache_append().
 *
 * \param positions Optional host array of `n` positions (NULL: continue from the last).
 * \param slots Optional host array receiving the `n` slot numbers (`page * page_size + slot`).
 * \param slots_capacity Its length, at least `n` (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `slots_capacity`).
 * \return NULL on success; #KVSIEVE_ERROR_OUT_OF_PAGES when the pool is full (nothing
 * changed).
 */
kvsieve_error_t *kvsieve_cuda_cache_append(kvsieve_cuda_cache_t *cache, uint64_t seq, size_t n, const int32_t *positions,
                                           int64_t *slots, size_t slots_capacity);

/**
 * \brief Write K and V of tokens `start .. start + n` of one layer, from host tensors
 * (#KVSIEVE_DEVICE_CPU, any accepted dtype and strides) or device tensors on the cache's
 * device (float32, float16 or bfloat16, any strides), `[n, num_kv_heads, head_dim]`. Shared
 * pages are copied first; key bounds are updated.
 */
kvsieve_error_t *kvsieve_cuda_cache_write(kvsieve_cuda_cache_t *cache, uint64_t seq, size_t layer, size_t start,
                                          const kvsieve_tensor_t *k, const kvsieve_tensor_t *v);

/** \brief Keep the first `new_len` tokens of a sequence, as kvsieve_cache_truncate(). */
kvsieve_error_t *kvsieve_cuda_cache_truncate(kvsieve_cuda_cache_t *cache, uint64_t seq, size_t new_len);

/** \brief Evict whole pages of a sequence, as kvsieve_cache_evict_pages(): `page_indices`
 *  (host, `n` values) index its page list, strictly increasing. */
kvsieve_error_t *kvsieve_cuda_cache_evict_pages(kvsieve_cuda_cache_t *cache, uint64_t seq, const size_t *page_indices,
                                                size_t n);

/** \brief Keep only the listed tokens of a sequence in fresh pages, as
 *  kvsieve_cache_compact() (same arguments and checks); rows are moved on the device. */
kvsieve_error_t *kvsieve_cuda_cache_compact(kvsieve_cuda_cache_t *cache, uint64_t seq, uint32_t kind,
                                            const uint32_t *keep_indptr, size_t num_lists, const uint32_t *keep,
                                            size_t keep_len);

/**
 * \brief Describe one layer of the cache for a batch of sequences as a device descriptor:
 * the layer's pages, a new device page table of `seqs` (in that order), slot positions, and
 * the cache's key convention.
 *
 * \param layer Layer index.
 * \param seqs Host array of `num_seqs` sequence ids.
 * \param out_table Receives the page table (required); the descriptor points into it, so
 *        keep it until the queued work reading the descriptor completes, then free it with
 *        kvsieve_cuda_table_free().
 * \param out_view Receives the descriptor (required), initialised by the caller with
 *        kvsieve_paged_kv_init() (kvsieve writes the fields its `struct_size` covers).
 * \param out_key_bounds Optional: receives the layer's key bounds for
 *        kvsieve_cuda_page_bounds(), or NULL when the cache does not track them.
 * \param out_max_seq_len Optional: receives the longest sequence's length (the
 *        `max_seq_len` of the decode calls).
 *
 * The descriptor stays valid until one of the sequences changes (append, write into a
 * shared page, truncate, evict, compact, free) or the cache is freed; make a new view then.
 */
kvsieve_error_t *kvsieve_cuda_cache_layer_view(const kvsieve_cuda_cache_t *cache, size_t layer, const uint64_t *seqs,
                                               size_t num_seqs, kvsieve_cuda_table_t **out_table,
                                               kvsieve_paged_kv_t *out_view, const void **out_key_bounds,
                                               size_t *out_max_seq_len);

/** \brief Free a page table from kvsieve_cuda_cache_layer_view(). NULL is ignored. */
void kvsieve_cuda_table_free(kvsieve_cuda_table_t *table);

/* Key bounds, selection, prefill, clusters and GemFilter ------------------------------- */

/**
 * \brief One page's key-bound update for kvsieve_cuda_update_key_bounds(): fold the keys in
 * the slots whose bits are set in `slot_mask` (bit s = slot s, page_size at most 64) into
 * the bounds of `page`, starting from the bounds stored there, or from empty (+inf / -inf)
 * when `reset` is non-zero (a page reused for a new sequence). Lives in device memory.
 *
 * Not a versioned struct (no `struct_size`): the kernels read the array from device memory,
 * where the host cannot check a size without waiting for the device, so, like
 * ::kvsieve_tensor_t, its layout is fixed for the `libkvsieve.so.0` line; a different one
 * would come with a new type and function.
 */
typedef struct kvsieve_key_bounds_entry {
    int32_t page;
    uint32_t reset;
    uint64_t slot_mask;
} kvsieve_key_bounds_entry_t;

/**
 * \brief Keep Quest page key bounds in engine device memory: for each entry, the
 * per-channel minimum and maximum of the keys in its slots, per KV head.
 *
 * `key_bounds` holds, for every page of the pool, `[num_kv_heads][2][head_dim]` elements of
 * the page dtype (minima, then maxima), pages back to back:
 * `num_pages * num_kv_heads * 2 * head_dim` values in all. Run it after
 * kvsieve_cuda_paged_append() (same stream) with one entry per page the append wrote.
 *
 * \param kv Device descriptor of the pages (required); float16 or bfloat16 pages of at most
 *        64 slots (#KVSIEVE_ERROR_UNSUPPORTED otherwise). Its page table is not used.
 * \param key_bounds Device memory of the bounds (required when `num_entries` > 0).
 * \param entries Device array of `num_entries` entries with distinct pages below
 *        `num_pages` (required when `num_entries` > 0).
 * \param num_entries Entries (0 queues nothing).
 * \param stream `cudaStream_t` as `void *` (NULL = legacy default stream).
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Graph-capturable. Ownership: nothing is retained. Thread safety: thread-safe, provided no
 * other work writes the same pages' bounds meanwhile.
 */
kvsieve_error_t *kvsieve_cuda_update_key_bounds(const kvsieve_paged_kv_t *kv, void *key_bounds,
                                                const kvsieve_key_bounds_entry_t *entries, size_t num_entries,
                                                void *stream);

/**
 * \brief Page-bound (Quest) selection on the GPU, as kvsieve_selection_page_bounds(), for
 * every sequence of `kv` at once, written as the device CSR kvsieve_cuda_paged_decode_sparse()
 * reads: list `b * num_kv_heads + h` (sequence b, KV head h) is
 * `sel_indices[sel_indptr[i] .. sel_indptr[i + 1]]`, the ascending tokens of the kept pages.
 *
 * \param kv Device descriptor (required); keys stored after RoPE; float16 or bfloat16.
 * \param max_seq_len An upper bound on every sequence's length (sizes the scratch).
 * \param key_bounds The bounds kvsieve_cuda_update_key_bounds() keeps (required).
 * \param q Queries `[batch, num_qo_heads, head_dim]` on the device (float32/float16/bfloat16,
 *        contiguous).
 * \param config Budget and minimum pages (required; host struct, copied).
 * \param sel_indptr Device memory for `batch * num_kv_heads + 1` int32 (written).
 * \param sel_indices Device memory for `batch * num_kv_heads * max_seq_len` int32 (written;
 *        the lists are packed, so less is used). Pass `max_seq_len` as `max_per_head` to the
 *        sparse decode that reads them.
 * \param stream `cudaStream_t` as `void *`.
 * \return NULL when queued, or an error (owned by the caller).
 *
 * kvsieve keeps scratch per (device, stream, batch shape), allocated by the first call of
 * a shape: run one call of each shape before capturing a CUDA graph; later calls queue
 * kernels only and can be captured. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_page_bounds(const kvsieve_paged_kv_t *kv, size_t max_seq_len, const void *key_bounds,
                                          const kvsieve_tensor_t *q, const kvsieve_page_bounds_config_t *config,
                                          int32_t *sel_indptr, int32_t *sel_indices, void *stream);

/**
 * \brief Prefill attention on the GPU (tensor cores, mma.sync) over engine-owned pages: as
 * kvsieve_paged_prefill_sparse(), with optional per-KV-head windows (sinks + window, which
 * is also LM-Infinite's Λ-mask over post-RoPE keys) and optional device token lists.
 *
 * \param kv Device descriptor (required); float16 or bfloat16 pages, head_dim 64 or 128, keys
 *        stored after RoPE (RoPE at read is not done here: #KVSIEVE_ERROR_INVALID_ARGUMENT).
 * \param q Queries `[total, num_qo_heads, head_dim]` on the device, the page dtype, contiguous.
 * \param qo_indptr Host array of `batch + 1` int32: rows `qo_indptr[b] .. qo_indptr[b + 1]`
 *        of `q` are the last tokens of sequence b (required).
 * \param causal Causal mask (query i of n in a sequence of L tokens sees tokens `0 ..= L - n + i`).
 * \param windows Host array of `num_kv_heads` windows, or NULL with `num_windows` 0; an entry
 *        with `window` 0 is no window for that head.
 * \param num_windows 0 or `num_kv_heads` (#KVSIEVE_ERROR_SHAPE naming `windows` otherwise).
 * \param sel_indptr, sel_indices Optional device CSR over (sequence, KV head), as for
 *        kvsieve_cuda_paged_decode_sparse(); both NULL or both set.
 * \param max_per_head An upper bound on every list's length (with lists).
 * \param out Output, the shape and dtype of `q`, on the device.
 * \param lse Optional: device memory for `total * num_qo_heads` floats.
 * \param params Optional host struct (NULL = defaults); scale and soft cap.
 * \param stream `cudaStream_t` as `void *`.
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Not graph-capturable: `qo_indptr` and `windows` are copied to the device by the call.
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_paged_prefill(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *q,
                                            const int32_t *qo_indptr, bool causal,
                                            const kvsieve_streaming_window_t *windows, size_t num_windows,
                                            const int32_t *sel_indptr, const int32_t *sel_indices,
                                            size_t max_per_head, const kvsieve_tensor_t *out, float *lse,
                                            const kvsieve_attention_params_t *params, void *stream);

/**
 * \brief A K-means index (centroids, sizes, each token's cluster, the coarse level) resident
 * on one CUDA device, for centroid retrieval on the GPU. Made by
 * kvsieve_cuda_cluster_index_upload() or kvsieve_cuda_cluster_index_build(); released with
 * kvsieve_cuda_cluster_index_free().
 *
 * Thread safety: calls on one handle are serialised on the host; their device work must be
 * ordered by the caller (one stream, or synchronised), since retrieval reuses the handle's
 * device scratch.
 */
typedef struct kvsieve_cuda_cluster_index kvsieve_cuda_cluster_index_t;

/**
 * \brief Copy a host index (kvsieve_cluster_index_build(), _load(), _rebuild()) to CUDA device
 * `device_id`. Copy again after kvsieve_cluster_index_assign_new() or a rebuild.
 *
 * \param index The host index (required; read under its shared lock).
 * \param device_id CUDA device ordinal, >= 0.
 * \param stream `cudaStream_t` as `void *`; the call waits for its copies.
 * \param out Receives the new device index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out`. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_cluster_index_upload(const kvsieve_cluster_index_t *index, int32_t device_id,
                                                   void *stream, kvsieve_cuda_cluster_index_t **out);

/**
 * \brief Cluster keys held in device memory on the GPU, as kvsieve_cluster_index_build() does
 * (k-means++ seeding with `config->seed`, Lloyd iterations up to `config->max_iter`, empty
 * clusters repaired, the last `exclude_window` tokens left out); the coarse level (a K-means
 * of the fine centroids, small) runs on the host.
 *
 * \param keys Keys `[n, num_kv_heads, head_dim]` on the device (float32/float16/bfloat16,
 *        channels contiguous, finite: the device does not check).
 * \param config Options (required); as for kvsieve_cluster_index_build(), with the same
 *        errors naming the fields.
 * \param stream `cudaStream_t` as `void *`; the call waits for the clustering.
 * \param out_host Optional: receives the same index as a host handle (saving, calibration,
 *        kvsieve_cluster_index_assign_new()).
 * \param out Receives the device index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` and `*out_host`. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_cluster_index_build(const kvsieve_tensor_t *keys, const kvsieve_cluster_config_t *config,
                                                  void *stream, kvsieve_cluster_index_t **out_host,
                                                  kvsieve_cuda_cluster_index_t **out);

/**
 * \brief Free a device index. NULL is ignored. No call on it may be running, and no queued
 * work may still read it.
 */
void kvsieve_cuda_cluster_index_free(kvsieve_cuda_cluster_index_t *index);

/**
 * \brief Shape of a device index. Each out-parameter may be NULL.
 *
 * \param index The index (required).
 * \param num_kv_heads, head_dim, num_clusters, num_coarse_clusters Per-head counts (coarse 0
 *        without a coarse level).
 * \param clustered_len Tokens clustered per head: what sizes retrieval's `sel_indices`.
 * \return NULL on success; an error (owned by the caller) for a NULL index.
 */
kvsieve_error_t *kvsieve_cuda_cluster_index_info(const kvsieve_cuda_cluster_index_t *index, size_t *num_kv_heads,
                                                 size_t *head_dim, size_t *num_clusters,
                                                 size_t *num_coarse_clusters, size_t *clustered_len);

/**
 * \brief Centroid retrieval on the GPU for one decode query, as
 * kvsieve_cluster_index_retrieve() (same rules, flat or hierarchical), written as a device
 * CSR over KV heads: list h is `sel_indices[sel_indptr[h] .. sel_indptr[h + 1]]`, ascending
 * clustered tokens. Tokens after the clustered ones are not listed (read them through a
 * window). `config->seq_len` is not used.
 *
 * \param index The device index (required).
 * \param q The query `[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]` on the index's
 *        device (float32/float16/bfloat16, contiguous), after RoPE.
 * \param config The rule (required; host struct, read during the call).
 * \param sel_indptr Device memory for `num_kv_heads + 1` int32 (written).
 * \param sel_indices Device memory for `num_kv_heads * clustered_len` int32 (written; packed).
 * \param stream `cudaStream_t` as `void *`.
 * \return NULL when queued, or an error (owned by the caller).
 *
 * The first call (and one with another query head count) allocates the handle's scratch;
 * later calls queue kernels only and can be captured in a CUDA graph, except that a
 * threshold differing from the previous call's is copied to the device first. Thread safety: see
 * ::kvsieve_cuda_cluster_index_t.
 */
kvsieve_error_t *kvsieve_cuda_cluster_index_retrieve(const kvsieve_cuda_cluster_index_t *index, const kvsieve_tensor_t *q,
                                                     const kvsieve_retrieve_config_t *config, int32_t *sel_indptr,
                                                     int32_t *sel_indices, void *stream);

/**
 * \brief GemFilter on the GPU, as kvsieve_gemfilter_select(): the `config->k` tokens the last
 * query points at (scores summed over heads, average-pooled, first/last tokens forced),
 * ascending, written to device memory.
 *
 * \param q The filter layer's last query `[num_qo_heads, head_dim]` or
 *        `[1, num_qo_heads, head_dim]` on the device.
 * \param keys The filter layer's keys `[n, num_kv_heads, head_dim]` on the same device,
 *        after RoPE, channels contiguous.
 * \param config Options (required; host struct): `k` in `1 ..= n`, odd `pool_kernel`,
 *        `keep_first + keep_last <= k` (errors name the field).
 * \param indices Device memory for `config->k` int32 (written).
 * \param stream `cudaStream_t` as `void *`.
 * \return NULL when queued, or an error (owned by the caller).
 *
 * Not graph-capturable (it allocates scratch for `n` tokens; GemFilter runs once per prompt).
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cuda_gemfilter_select(const kvsieve_tensor_t *q, const kvsieve_tensor_t *keys,
                                               const kvsieve_gemfilter_config_t *config, int32_t *indices,
                                               void *stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_CUDA_H */
