/**
 * \file kvsieve/gemfilter.h
 *
 * \brief Prompt filtering: GemFilter (token scores, selection, filter-layer calibration),
 * SnapKV and the average pool both apply to their scores.
 * Score buffers as long as the context (and SnapKV's window x context logits) are
 * allocated fallibly: #KVSIEVE_ERROR_OUT_OF_MEMORY when memory runs out.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_GEMFILTER_H
#define KVSIEVE_GEMFILTER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "tensor.h"
#include "cache.h"
#include "selection.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief Options of GemFilter's selection. Initialise with kvsieve_gemfilter_config_default()
 * (or kvsieve_gemfilter_config_init()), then change fields.
 *
 * - `struct_size`: set by the initialisers (a versioned struct: see the conventions in
 *   kvsieve.h).
 * - `k`: tokens to keep in all, forced ones included; 1..n (#KVSIEVE_ERROR_OUT_OF_RANGE
 *   naming `k` otherwise) and at least `keep_first + keep_last`
 *   (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `k`).
 * - `pool_kernel`: width of the centred average pool over the scores, odd; 1 turns pooling
 *   off (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `pool_kernel` for 0 or an even width).
 * - `keep_first`: the first `keep_first` tokens are always kept (attention sinks).
 * - `keep_last`: the last `keep_last` tokens are always kept (the question).
 */
typedef struct kvsieve_gemfilter_config {
    size_t struct_size;
    size_t k;
    size_t pool_kernel;
    size_t keep_first;
    size_t keep_last;
} kvsieve_gemfilter_config_t;

/**
 * \brief Options of SnapKV. Initialise with kvsieve_snapkv_config_init(), then set `k`.
 *
 * - `struct_size`: set by kvsieve_snapkv_config_init() (a versioned struct: see the
 *   conventions in kvsieve.h).
 * - `k`: tokens kept per KV head, the observation window's `w` included; `w..n`
 *   (#KVSIEVE_ERROR_OUT_OF_RANGE naming `k` otherwise).
 * - `pool_kernel`: width of the centred average pool over the votes, odd (SnapKV uses 7);
 *   1 turns pooling off (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `pool_kernel` otherwise).
 * - `scale`: multiplier of q·k before the softmax, finite (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `scale` otherwise); 0 means 1/sqrt(head_dim).
 */
typedef struct kvsieve_snapkv_config {
    size_t struct_size;
    size_t k;
    size_t pool_kernel;
    float scale;
} kvsieve_snapkv_config_t;

/**
 * \brief Initialise a GemFilter configuration: `k` 0 (set it), `pool_kernel` 5, no forced
 * tokens, `struct_size` set.
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_gemfilter_config_init(kvsieve_gemfilter_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->pool_kernel = 5;
}

/**
 * \brief A GemFilter configuration keeping `k` tokens: `pool_kernel` 5, no forced tokens.
 * Nothing is validated here; the calls taking the configuration validate it.
 *
 * Ownership: returns a struct by value; nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline kvsieve_gemfilter_config_t kvsieve_gemfilter_config_default(size_t k) {
    kvsieve_gemfilter_config_t config;
    kvsieve_gemfilter_config_init(&config);
    config.k = k;
    return config;
}

/**
 * \brief Initialise SnapKV options: `k` 0 (set it), `pool_kernel` 7 (SnapKV's), `scale` 0
 * (1/sqrt(head_dim)), `struct_size` set.
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_snapkv_config_init(kvsieve_snapkv_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->pool_kernel = 7;
}

/**
 * \brief GemFilter's unpooled token scores: for every token t, the sum over query heads h of
 * `q_h · k_t` (unscaled logits, before softmax), query head h reading KV head
 * `h / (num_qo_heads / num_kv_heads)`.
 *
 * GemFilter (a one-shot prompt filter) runs the first layers of a model over the whole
 * prompt, takes the last query at a filter layer and keeps the prompt tokens it points at;
 * kvsieve_gemfilter_select() does the keeping, this returns the scores themselves.
 *
 * \param q The filter layer's last query, after RoPE: `[num_qo_heads, head_dim]` or
 *        `[1, num_qo_heads, head_dim]`, any accepted dtype and strides; num_qo_heads a
 *        positive multiple of num_kv_heads and head_dim that of the keys
 *        (#KVSIEVE_ERROR_SHAPE naming `q` otherwise).
 * \param keys The key source (required); see ::kvsieve_key_source_t.
 * \param scores Caller buffer of `capacity` floats (NULL only if `capacity` is 0); receives n
 *        scores. Must not overlap `q` or the key tensor.
 * \param capacity Its length; fewer than n gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `capacity` (nothing is written).
 * \param out_len Optional: receives n, the number of scores written; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: the result is copied into caller memory; nothing is retained.
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_gemfilter_scores(const kvsieve_tensor_t *q, const kvsieve_key_source_t *keys, float *scores,
                                          size_t capacity, size_t *out_len);

/**
 * \brief Centred 1-D average pool: `out[i]` is the mean of the entries `i - r ..= i + r`
 * (`r = kernel / 2`) of `scores` that exist, so entries near the ends average fewer values.
 * The smoothing GemFilter and SnapKV apply to their scores.
 *
 * \param scores `n` floats (NULL only if `n` is 0).
 * \param n Number of scores.
 * \param kernel Width, odd; 1 copies the scores (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `kernel` for 0 or an even width).
 * \param out Receives `n` floats (NULL only if `n` is 0); must not overlap `scores`.
 * \return NULL on success, or an error (owned by the caller); `out` untouched on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_avg_pool(const float *scores, size_t n, size_t kernel, float *out);

/**
 * \brief GemFilter: the `config->k` tokens the filter layer's last query points at,
 * ascending by position. Tokens rank by their kvsieve_gemfilter_scores() pooled with
 * `config->pool_kernel` (ties by position); the first `keep_first` and last `keep_last`
 * tokens are kept whatever their score. An engine then prefills only these tokens again
 * (with fresh positions) and answers from them.
 *
 * \param q The query, as in kvsieve_gemfilter_scores().
 * \param keys The key source (required); n must be at least 1
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `keys` otherwise).
 * \param config The options (required); copied. See ::kvsieve_gemfilter_config_t for the
 *        errors it can give.
 * \param indices Caller buffer of `capacity` values (NULL only if `capacity` is 0); receives
 *        the `config->k` token indices. Must not overlap `q` or the key tensor.
 * \param capacity Its length; fewer than `config->k` gives #KVSIEVE_ERROR_INVALID_ARGUMENT
 *        naming `capacity` (nothing is written).
 * \param out_len Optional: receives the number of indices written (`config->k`); untouched on
 *        failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: the result is copied into caller memory; nothing is retained.
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_gemfilter_select(const kvsieve_tensor_t *q, const kvsieve_key_source_t *keys,
                                          const kvsieve_gemfilter_config_t *config, uint32_t *indices,
                                          size_t capacity, size_t *out_len);

/**
 * \brief SnapKV: score the prompt by the attention its last `w` queries (the observation
 * window) pay to it, and keep, per KV head, the best `config->k - w` tokens before the window
 * plus the window itself.
 *
 * Each window query i (token `n - w + i`) attends causally to tokens `0 ..= n - w + i`:
 * softmax per query head of `scale * q · k`. The probabilities it gives the prefix (tokens
 * `0 .. n - w`) are summed over the window and over the query heads of each KV head (the
 * votes), pooled with `config->pool_kernel`, and the top `k - w` prefix tokens of each KV
 * head kept (ties by position).
 *
 * The per-head selection feeds kvsieve_cache_compact() with #KVSIEVE_KEEP_PER_HEAD (list
 * `layer * num_kv_heads + h` is head h of that layer's selection; every head keeps
 * `config->k` tokens), or sparse attention; the union over heads suits re-prefilling once.
 *
 * \param q_window The window's queries, after RoPE: `[w, num_qo_heads, head_dim]`, any
 *        accepted dtype and strides; num_qo_heads a positive multiple of num_kv_heads
 *        (#KVSIEVE_ERROR_SHAPE naming `q_window`), `w` in 1..n (#KVSIEVE_ERROR_OUT_OF_RANGE
 *        naming `q_window`).
 * \param keys The key source (required); see ::kvsieve_key_source_t.
 * \param config The options (required); copied.
 * \param out Receives a new selection of num_kv_heads heads over n tokens (required);
 *        untouched on failure.
 * \param union_indices Optional: caller buffer of `union_capacity` values that receives the
 *        tokens kept by any head, ascending. NULL skips it. Must not overlap the inputs.
 * \param union_capacity Length of `union_indices`; n always suffices. Fewer than the union's
 *        length gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming `union_capacity` (nothing is
 *        written, no selection made). Ignored when `union_indices` is NULL.
 * \param out_union_len Optional: receives the union's length (also when `union_indices` is
 *        NULL); untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error; nothing else is retained.
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_snapkv(const kvsieve_tensor_t *q_window, const kvsieve_key_source_t *keys,
                                const kvsieve_snapkv_config_t *config, kvsieve_selection_t **out,
                                uint32_t *union_indices, size_t union_capacity, size_t *out_union_len);

/**
 * \brief Filter-layer calibration: for each layer l, GemFilter's selection from that layer's
 * last query `queries[l]` and keys `keys[l]` (kvsieve_gemfilter_select() with `config`), and
 * the fraction of a known needle, tokens `needle_start .. needle_end`, it keeps. The best
 * filter layer is the earliest one with high recall.
 *
 * Errors of one layer's query or keys name `queries[l]` or `keys[l]`.
 *
 * \param num_layers Number of layers to calibrate.
 * \param queries `num_layers` query descriptors, each as `q` of kvsieve_gemfilter_scores()
 *        (NULL only if `num_layers` is 0).
 * \param keys `num_layers` key sources (NULL only if `num_layers` is 0), each initialised
 *        with kvsieve_key_source_init(), so all of one `struct_size`; sources may mix
 *        tensors and caches, and share a cache (each cache's shared lock is taken once, for
 *        the whole call).
 * \param needle_start First token of the needle.
 * \param needle_end One past its last token; greater than `needle_start`
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `needle_end` otherwise).
 * \param config The options (required); copied. `k` must suit every layer's context.
 * \param recalls Receives `num_layers` recalls in [0, 1], layer order (NULL only if
 *        `num_layers` is 0); must not overlap the inputs.
 * \return NULL on success, or an error (owned by the caller); `recalls` untouched on failure.
 *
 * Ownership: nothing is retained; the caller frees any returned error.
 *
 * Thread safety: thread-safe (cache sources take their caches' shared locks).
 */
kvsieve_error_t *kvsieve_gemfilter_calibrate_layers(size_t num_layers, const kvsieve_tensor_t *queries,
                                                    const kvsieve_key_source_t *keys, size_t needle_start,
                                                    size_t needle_end, const kvsieve_gemfilter_config_t *config,
                                                    double *recalls);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_GEMFILTER_H */
