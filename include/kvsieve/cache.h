/**
 * \file kvsieve/cache.h
 *
 * \brief The cache: a kvsieve-owned paged KV cache (configuration, statistics, lifecycle),
 * its sequences (create, fork, append, write, truncate, evict, compact), queries (lengths,
 * positions, page tables, key bounds, stored K/V) and key sources, which name the keys of
 * one layer in a tensor or in a cache.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_CACHE_H
#define KVSIEVE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/** \brief Order of elements inside one page of one layer. */
typedef enum kvsieve_page_layout {
    /** `[page_size, num_kv_heads, head_dim]`, tokens outermost (vLLM, FlashInfer default). */
    KVSIEVE_LAYOUT_NHD = 0,
    /** `[num_kv_heads, page_size, head_dim]`, heads outermost. */
    KVSIEVE_LAYOUT_HND = 1
} kvsieve_page_layout_t;

/** \brief Whether stored keys already carry rotary position embedding. */
typedef enum kvsieve_key_rope {
    /** The engine applied RoPE before writing keys (the usual case). */
    KVSIEVE_KEYS_POST_ROPE = 0,
    /** Keys are stored without RoPE; attention rotates them when reading, from each
     *  slot's stored position, and takes queries before RoPE too (see
     *  ::kvsieve_attention_params_t `rope` and `position_mode`). */
    KVSIEVE_KEYS_PRE_ROPE = 1
} kvsieve_key_rope_t;

/**
 * \brief Shape and storage of a cache. Initialise with kvsieve_cache_config_default() (or
 * kvsieve_cache_config_init()), then change fields.
 *
 * - `struct_size`: `sizeof(kvsieve_cache_config_t)` as the program was compiled, set by the
 *   initialisers (a versioned struct: see the conventions in kvsieve.h). Also set it before
 *   kvsieve_cache_get_config() fills the struct.
 * - `num_layers`, `num_kv_heads`: at least 1.
 * - `head_dim`: a multiple of 8 from 8 to 512 (#KVSIEVE_ERROR_UNSUPPORTED otherwise).
 * - `page_size`: token slots per page, 1 to 1024.
 * - `capacity_pages`: pages in the pool, shared by all sequences; each page spans every
 *   layer. All memory is allocated by kvsieve_cache_new().
 * - `dtype`: storage type (float32, float16 or bfloat16); writes convert, rounding to nearest.
 * - `layout`: a ::kvsieve_page_layout_t value.
 * - `key_rope`: a ::kvsieve_key_rope_t value.
 * - `track_key_bounds`: keep per-page, per-head, per-channel key min/max up to date.
 */
typedef struct kvsieve_cache_config {
    size_t struct_size;
    size_t num_layers;
    size_t num_kv_heads;
    size_t head_dim;
    size_t page_size;
    size_t capacity_pages;
    kvsieve_dtype_t dtype;
    uint32_t layout;
    uint32_t key_rope;
    bool track_key_bounds;
} kvsieve_cache_config_t;

/**
 * \brief Memory statistics of a cache (see kvsieve_cache_stats()). Initialise with
 * kvsieve_cache_stats_init() before the call: `struct_size` tells kvsieve how many bytes the
 * program's struct has (a versioned struct: see the conventions in kvsieve.h).
 *
 * `bytes_per_page` counts K and V of one page over all layers; `bytes_used` those of the
 * used pages; `bytes_reserved` everything allocated (K, V, positions, key bounds);
 * `num_tokens` counts shared tokens once per sequence that holds them.
 */
typedef struct kvsieve_cache_stats {
    size_t struct_size;
    size_t pages_total;
    size_t pages_used;
    size_t pages_free;
    size_t bytes_per_page;
    size_t bytes_used;
    size_t bytes_reserved;
    size_t num_sequences;
    size_t num_tokens;
} kvsieve_cache_stats_t;

/**
 * \brief A kvsieve-owned paged KV cache holding many sequences. Opaque.
 *
 * Created by kvsieve_cache_new(), released by kvsieve_cache_free(). Thread safety: see the
 * conventions in kvsieve.h: readers run concurrently, writers exclusively, free alone.
 */
typedef struct kvsieve_cache kvsieve_cache_t;

/**
 * \brief Initialise a configuration: `struct_size` set, no shape (every size 0), float16
 * storage, NHD layout, post-RoPE keys and key bounds on. Use it before
 * kvsieve_cache_get_config(); to create a cache, kvsieve_cache_config_default() also sets the
 * shape.
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_cache_config_init(kvsieve_cache_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->dtype.code = KVSIEVE_DTYPE_CODE_FLOAT;
    config->dtype.bits = 16;
    config->dtype.lanes = 1;
    config->layout = KVSIEVE_LAYOUT_NHD;
    config->key_rope = KVSIEVE_KEYS_POST_ROPE;
    config->track_key_bounds = true;
}

/**
 * \brief A configuration with the given shape, float16 storage, NHD layout, post-RoPE keys
 * and key bounds on (kvsieve_cache_config_init() and the shape). Nothing is validated here;
 * kvsieve_cache_new() validates.
 *
 * Ownership: returns a struct by value; nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline kvsieve_cache_config_t kvsieve_cache_config_default(size_t num_layers, size_t num_kv_heads,
                                                                  size_t head_dim, size_t page_size,
                                                                  size_t capacity_pages) {
    kvsieve_cache_config_t config;
    kvsieve_cache_config_init(&config);
    config.num_layers = num_layers;
    config.num_kv_heads = num_kv_heads;
    config.head_dim = head_dim;
    config.page_size = page_size;
    config.capacity_pages = capacity_pages;
    return config;
}

/**
 * \brief Initialise statistics before kvsieve_cache_stats(): all zero, `struct_size` set.
 *
 * Ownership: writes `*stats` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_cache_stats_init(kvsieve_cache_stats_t *stats) {
    memset(stats, 0, sizeof(*stats));
    stats->struct_size = sizeof(*stats);
}

/**
 * \brief Create a cache and allocate its whole page pool.
 *
 * \param config The configuration (required); copied, not retained. A `struct_size` kvsieve
 *        does not know gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming `config.struct_size`.
 * \param out Receives the new cache (required). Ownership: the caller owns it and releases
 *        it with kvsieve_cache_free(). Untouched on failure.
 * \return NULL on success, or an error (owned by the caller), e.g. #KVSIEVE_ERROR_INVALID_ARGUMENT
 *         for page_size 0, #KVSIEVE_ERROR_UNSUPPORTED for a head_dim kvsieve does not support.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cache_new(const kvsieve_cache_config_t *config, kvsieve_cache_t **out);

/**
 * \brief Release a cache and all its memory.
 *
 * \param cache A cache, or NULL (ignored). Ownership: taken; the handle must not be used
 *        afterwards.
 *
 * Thread safety: not thread-safe with respect to `cache`: no other call on it may be
 * running or start afterwards.
 */
void kvsieve_cache_free(kvsieve_cache_t *cache);

/**
 * \brief The configuration the cache was created with.
 *
 * \param cache The cache (required).
 * \param out Receives the configuration (required), initialised by the caller with
 *        kvsieve_cache_config_init(): kvsieve writes the fields its `struct_size` covers and
 *        leaves `struct_size` as it is. Untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_get_config(const kvsieve_cache_t *cache, kvsieve_cache_config_t *out);

/**
 * \brief Memory statistics.
 *
 * \param cache The cache (required).
 * \param out Receives the statistics (required), initialised by the caller with
 *        kvsieve_cache_stats_init(): kvsieve writes the fields its `struct_size` covers.
 *        Untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_stats(const kvsieve_cache_t *cache, kvsieve_cache_stats_t *out);

/* Sequences ---------------------------------------------------------------------------- */

/**
 * \brief Create an empty sequence.
 *
 * \param cache The cache (required).
 * \param out_seq Receives the new sequence id (required); ids are never reused within a
 *        cache. Untouched on failure.
 *
 * Ownership: the sequence lives in the cache until kvsieve_cache_free_sequence() or
 * kvsieve_cache_free(); the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_create_sequence(kvsieve_cache_t *cache, uint64_t *out_seq);

/**
 * \brief Create a sequence that shares all pages of `seq` (prefix sharing). A shared page is
 * copied on the first write to it by either sequence (including appends into a partly
 * filled last page), so the two then diverge safely.
 *
 * \param cache The cache (required).
 * \param seq The sequence to fork (#KVSIEVE_ERROR_UNKNOWN_SEQUENCE if the cache does not hold it).
 * \param out_seq Receives the new sequence id (required); untouched on failure.
 *
 * Ownership: the new sequence lives in the cache until freed like any other; the caller
 * frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_fork(kvsieve_cache_t *cache, uint64_t seq, uint64_t *out_seq);

/**
 * \brief Drop a sequence; pages no other sequence shares return to the pool.
 *
 * Ownership: the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_free_sequence(kvsieve_cache_t *cache, uint64_t seq);

/**
 * \brief Append `n` token slots to a sequence, allocating pages as needed.
 *
 * K and V of the new tokens must then be written for every layer (kvsieve_cache_write()
 * or kvsieve_cache_write_slots()) before attention reads them.
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param n Number of tokens to append.
 * \param positions Optional: `n` original positions of the new tokens. NULL numbers them
 *        from one past the last stored position (0 for an empty sequence).
 * \param out_slots Optional: receives `n` slot indices `page * page_size + offset`, the
 *        slot mapping for kvsieve_cache_write_slots(). Untouched on failure.
 * \return NULL on success, or an error (owned by the caller), e.g. #KVSIEVE_ERROR_OUT_OF_PAGES
 *         when the pool is exhausted; the sequence is then unchanged.
 *
 * Ownership: kvsieve reads (and copies what it keeps of) the caller's buffers during the
 * call only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_append(kvsieve_cache_t *cache, uint64_t seq, size_t n, const int32_t *positions,
                                      int64_t *out_slots);

/**
 * \brief Write K and V of one layer for tokens `start .. start + n` of a sequence.
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param layer Layer index, below num_layers (#KVSIEVE_ERROR_OUT_OF_RANGE otherwise).
 * \param start First token; `start + n` must not exceed the sequence length.
 * \param k Keys `[n, num_kv_heads, head_dim]`, any accepted dtype (converted to the cache
 *        dtype), any strides. Read only during the call.
 * \param v Values, same shape as `k`.
 * \return NULL on success, or an error (owned by the caller). Pages shared with another
 *         sequence are copied first, which can fail with #KVSIEVE_ERROR_OUT_OF_PAGES.
 *
 * Ownership: kvsieve reads (and copies what it keeps of) the caller's buffers during the
 * call only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_write(kvsieve_cache_t *cache, uint64_t seq, size_t layer, size_t start,
                                     const kvsieve_tensor_t *k, const kvsieve_tensor_t *v);

/**
 * \brief Write K and V of one layer into slots from kvsieve_cache_append()'s slot mapping.
 *
 * \param cache The cache (required).
 * \param seq The sequence; every slot must hold one of its tokens (#KVSIEVE_ERROR_OUT_OF_RANGE
 *        naming `slots[i]` otherwise).
 * \param layer Layer index.
 * \param slots `num_slots` slot indices.
 * \param num_slots Number of slots; the first dimension of `k` and `v`.
 * \param k Keys `[num_slots, num_kv_heads, head_dim]`.
 * \param v Values, same shape.
 *
 * Ownership: kvsieve reads (and copies what it keeps of) the caller's buffers during the
 * call only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_write_slots(kvsieve_cache_t *cache, uint64_t seq, size_t layer, const int64_t *slots,
                                           size_t num_slots, const kvsieve_tensor_t *k, const kvsieve_tensor_t *v);

/**
 * \brief Keep the first `new_len` tokens of a sequence (`new_len` <= its length). Pages past
 * the end return to the pool.
 *
 * Ownership: the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_truncate(kvsieve_cache_t *cache, uint64_t seq, size_t new_len);

/**
 * \brief Evict whole pages from anywhere in a sequence (for example pages that left a
 * sliding window). Remaining tokens keep their original positions; token indices after an
 * evicted page shift down.
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param page_indices Indices into the sequence's page list (0 = its first page), strictly
 *        increasing.
 * \param num_page_indices Length of `page_indices`.
 *
 * Ownership: kvsieve reads (and copies what it keeps of) the caller's buffers during the
 * call only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_evict_pages(kvsieve_cache_t *cache, uint64_t seq, const size_t *page_indices,
                                           size_t num_page_indices);

/* Compaction --------------------------------------------------------------------------- */

/** \brief How the token lists of kvsieve_cache_compact() apply. */
typedef enum kvsieve_keep_kind {
    /** One list for every layer and KV head. */
    KVSIEVE_KEEP_ALL = 0,
    /** One list per layer (num_layers lists, layer order). */
    KVSIEVE_KEEP_PER_LAYER = 1,
    /** One list per (layer, KV head), layer-major: list `layer * num_kv_heads + head`. */
    KVSIEVE_KEEP_PER_HEAD = 2
} kvsieve_keep_kind_t;

/**
 * \brief Keep only the listed tokens of a sequence: they move, in order and with their
 * original positions, into fresh pages (slot i holds each list's i-th token); the old pages
 * return to the pool, or stay with the sequences that share them. Needs
 * `ceil(k / page_size)` free pages for `k` kept tokens (#KVSIEVE_ERROR_OUT_OF_PAGES
 * otherwise, checked before anything changes).
 *
 * The lists are CSR: list l is `keep[keep_indptr[l] .. keep_indptr[l+1]]`. Messages name a
 * bad token as `keep[l][i]` (entry i of list l).
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param kind A ::kvsieve_keep_kind_t value.
 * \param keep_indptr `num_lists + 1` offsets (required): `keep_indptr[0] = 0`,
 *        non-decreasing, `keep_indptr[num_lists] = keep_len`.
 * \param num_lists 1 for #KVSIEVE_KEEP_ALL, num_layers for #KVSIEVE_KEEP_PER_LAYER,
 *        `num_layers * num_kv_heads` for #KVSIEVE_KEEP_PER_HEAD
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `num_lists` otherwise).
 * \param keep The token indices of every list; each list strictly ascending and below the
 *        sequence's length, all lists of one length. Lists that differ need keys stored
 *        after RoPE (slot positions come from the first list).
 * \param keep_len Length of `keep`.
 *
 * Ownership: the lists are read during the call only; the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_compact(kvsieve_cache_t *cache, uint64_t seq, uint32_t kind, const uint32_t *keep_indptr,
                                       size_t num_lists, const uint32_t *keep, size_t keep_len);

/* Queries ------------------------------------------------------------------------------ */

/**
 * \brief Number of tokens a sequence holds.
 *
 * \param out_len Receives the length (required); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_seq_len(const kvsieve_cache_t *cache, uint64_t seq, size_t *out_len);

/**
 * \brief Original positions of a sequence's tokens, in token order.
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param positions Caller buffer of `capacity` int32 values (NULL only if `capacity` is 0).
 * \param capacity Its length; fewer than the sequence's length gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written).
 * \param out_len Optional: receives the number of positions written (the sequence length).
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_positions(const kvsieve_cache_t *cache, uint64_t seq, int32_t *positions, size_t capacity,
                                         size_t *out_len);

/**
 * \brief Size of the CSR page table of a batch: the number of page ids (`indptr[batch]`)
 * kvsieve_cache_page_table() will write to `indices`.
 *
 * Two-step export: call this, allocate `indices`, call kvsieve_cache_page_table(). If the
 * cache changes in between, the second call may report a too-small capacity; call again.
 *
 * \param seq_ids `batch` sequence ids.
 * \param out_num_indices Receives the count (required); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_page_table_size(const kvsieve_cache_t *cache, const uint64_t *seq_ids, size_t batch,
                                               size_t *out_num_indices);

/**
 * \brief Export the CSR page table of a batch (FlashInfer's convention).
 *
 * Sequence b (in `seq_ids` order) holds pages `indices[indptr[b] .. indptr[b+1]]`, in token
 * order; its last page holds `last_page_len[b]` tokens (1..page_size; 0 for a sequence
 * without pages). Token t is in page `indices[indptr[b] + t / page_size]`, slot
 * `t % page_size`.
 *
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param indptr Receives `batch + 1` offsets (required).
 * \param indices Receives the page ids; room for `indices_capacity` values (see
 *        kvsieve_cache_page_table_size()). Too little gives #KVSIEVE_ERROR_INVALID_ARGUMENT
 *        naming `indices_capacity`, and nothing is written.
 * \param indices_capacity Length of `indices`.
 * \param last_page_len Receives `batch` values.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_page_table(const kvsieve_cache_t *cache, const uint64_t *seq_ids, size_t batch,
                                          int32_t *indptr, int32_t *indices, size_t indices_capacity,
                                          int32_t *last_page_len);

/**
 * \brief Key bounds of one page of a sequence at a layer: per KV head and channel, the min
 * and max of the page's keys (as stored), head-major (`[num_kv_heads, head_dim]`). A page
 * with no written key gives +inf / -inf. Needs a cache created with `track_key_bounds`.
 *
 * \param page_index Index into the sequence's page list.
 * \param min Receives `num_kv_heads * head_dim` floats (required).
 * \param max Receives `num_kv_heads * head_dim` floats (required).
 * \param capacity Length of each of `min` and `max`; too small gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity`.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_page_key_bounds(const kvsieve_cache_t *cache, uint64_t seq, size_t layer,
                                               size_t page_index, float *min, float *max, size_t capacity);

/**
 * \brief Copy the stored keys and/or values of a sequence at a layer out as float32,
 * `[seq_len, num_kv_heads, head_dim]` row-major.
 *
 * \param keys Optional: receives the keys.
 * \param values Optional: receives the values. At least one of `keys` and `values` is required.
 * \param capacity Length of each given buffer in floats; at least
 *        `seq_len * num_kv_heads * head_dim` (#KVSIEVE_ERROR_INVALID_ARGUMENT otherwise).
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_read(const kvsieve_cache_t *cache, uint64_t seq, size_t layer, float *keys,
                                    float *values, size_t capacity);

/* Key sources -------------------------------------------------------------------------- */

/**
 * \brief Where the keys of one layer come from: a key tensor, or a sequence's keys at a
 * layer of a cache. Exactly one of `tensor` and `cache` is set
 * (#KVSIEVE_ERROR_INVALID_ARGUMENT naming the parameter when both or neither are).
 *
 * - `tensor`: keys `[n, num_kv_heads, head_dim]`, after RoPE, any accepted dtype and
 *   strides; `head_dim` as the cache accepts it (a multiple of 8 up to 512). Or NULL.
 * - `cache`: a cache whose keys are stored after RoPE (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming the parameter for #KVSIEVE_KEYS_PRE_ROPE); its read lock is taken for the call.
 *   Or NULL.
 * - `seq`, `layer`: with `cache`, the sequence (#KVSIEVE_ERROR_UNKNOWN_SEQUENCE) and the
 *   layer (#KVSIEVE_ERROR_OUT_OF_RANGE); ignored with `tensor`.
 *
 * - `struct_size`: set by kvsieve_key_source_init() (a versioned struct: see the conventions
 *   in kvsieve.h). In an array every entry has the same `struct_size`.
 *
 * Initialise with kvsieve_key_source_init(), then set `tensor`, or `cache`, `seq` and
 * `layer`. Messages name a field after the parameter that holds the struct, e.g.
 * `keys.tensor`, `keys.layer` (or `keys[2].layer` for an array).
 *
 * Token t is the sequence's t-th token in cache order (as in ::kvsieve_selection_t), or row
 * t of the tensor; n is the sequence's length or the tensor's first dimension.
 *
 * Ownership: the caller owns the struct, the tensor and the cache; kvsieve reads them during
 * the call only.
 */
typedef struct kvsieve_key_source {
    size_t struct_size;
    const kvsieve_tensor_t *tensor;
    const kvsieve_cache_t *cache;
    uint64_t seq;
    size_t layer;
} kvsieve_key_source_t;

/**
 * \brief Initialise a key source: no tensor and no cache (set one), `seq` and `layer` 0,
 * `struct_size` set.
 *
 * Ownership: writes `*source` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_key_source_init(kvsieve_key_source_t *source) {
    memset(source, 0, sizeof(*source));
    source->struct_size = sizeof(*source);
}

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_CACHE_H */
