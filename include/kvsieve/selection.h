/**
 * \file kvsieve/selection.h
 *
 * \brief Selections: which cached tokens each KV head of one (sequence, layer) reads, built
 * from CSR arrays, by the StreamingLLM and LM-Infinite rules, by set operations, or by
 * page bounds (Quest), and read back.
 * Selections sized by the arguments (dense, streaming, Λ, unions, and the copies
 * kvsieve_selection_from_csr() and kvsieve_selection_same_for_all_heads() make of their
 * arrays) are allocated fallibly: when memory runs out the call fails with
 * #KVSIEVE_ERROR_OUT_OF_MEMORY and writes nothing.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_SELECTION_H
#define KVSIEVE_SELECTION_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "tensor.h"
#include "cache.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief Which cached tokens each KV head of one (sequence, layer) reads. Opaque.
 *
 * CSR over KV heads: head h reads tokens `indices[head_indptr[h] .. head_indptr[h+1]]`,
 * strictly ascending, each below `seq_len` (the sequence's length when the selection was
 * made). A token index counts the sequence's tokens in cache order: token t lives in page
 * `t / page_size`, slot `t % page_size` of the sequence's page list. Query heads of a GQA
 * group share their KV head's tokens. Every selection method makes one; sparse attention
 * reads one; selections compose by kvsieve_selection_union().
 *
 * Made by the `kvsieve_selection_*` constructors, kvsieve_policy_select() and
 * kvsieve_cache_decode_with_policy(); released by kvsieve_selection_free().
 *
 * Thread safety: a selection never changes once made. Any number of threads may read it
 * (inspect it, pass it to attention) at once; kvsieve_selection_free() must run alone.
 */
typedef struct kvsieve_selection kvsieve_selection_t;

/**
 * \brief How much of a sequence a selection keeps (see kvsieve_selection_stats()).
 * Initialise with kvsieve_selection_stats_init() before the call: `struct_size` tells kvsieve
 * how many bytes the program's struct has (a versioned struct: see the conventions in
 * kvsieve.h).
 *
 * - `seq_len`, `num_kv_heads`: the selection's shape.
 * - `total`: selected tokens summed over heads.
 * - `density`: `total / (num_kv_heads * seq_len)`; 0 when `seq_len` is 0.
 * - `min_density`, `max_density`: smallest and largest per-head fraction of `seq_len`;
 *   0 when `seq_len` is 0.
 */
typedef struct kvsieve_selection_stats {
    size_t struct_size;
    size_t seq_len;
    size_t num_kv_heads;
    size_t total;
    double density;
    double min_density;
    double max_density;
} kvsieve_selection_stats_t;

/**
 * \brief Initialise selection statistics before kvsieve_selection_stats(): all zero,
 * `struct_size` set.
 *
 * Ownership: writes `*stats` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_selection_stats_init(kvsieve_selection_stats_t *stats) {
    memset(stats, 0, sizeof(*stats));
    stats->struct_size = sizeof(*stats);
}

/**
 * \brief A selection from its CSR arrays, copied and validated.
 *
 * \param seq_len Tokens in the sequence the selection is for (at most UINT32_MAX).
 * \param head_indptr `head_indptr_len` offsets (required): `head_indptr[0] = 0`,
 *        non-decreasing, `head_indptr[num_kv_heads] = nnz`.
 * \param head_indptr_len `num_kv_heads + 1`, at least 2 (#KVSIEVE_ERROR_SHAPE naming
 *        `head_indptr` otherwise).
 * \param indices `nnz` token indices; within each head strictly ascending
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `indices` and the first offending position
 *        otherwise) and below `seq_len` (#KVSIEVE_ERROR_OUT_OF_RANGE naming `indices[i]`).
 * \param nnz Length of `indices`.
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the arrays are copied, not retained; the caller owns `*out` and releases it
 * with kvsieve_selection_free(), and frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_from_csr(size_t seq_len, const uint32_t *head_indptr, size_t head_indptr_len,
                                            const uint32_t *indices, size_t nnz, kvsieve_selection_t **out);

/**
 * \brief Every token for every head.
 *
 * \param num_kv_heads At least 1.
 * \param seq_len Tokens in the sequence; `num_kv_heads * seq_len` at most UINT32_MAX
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `indices` otherwise). The indices take
 *        4 bytes per token and head: #KVSIEVE_ERROR_OUT_OF_MEMORY when they cannot be allocated.
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_dense(size_t num_kv_heads, size_t seq_len, kvsieve_selection_t **out);

/**
 * \brief The same token list for every head.
 *
 * \param num_kv_heads At least 1.
 * \param seq_len Tokens in the sequence.
 * \param indices `num_indices` token indices, strictly ascending
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `indices`), below `seq_len`
 *        (#KVSIEVE_ERROR_OUT_OF_RANGE naming `indices[i]`).
 * \param num_indices Length of `indices`.
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: `indices` is copied, not retained; the caller owns `*out` (release with
 * kvsieve_selection_free()) and frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_same_for_all_heads(size_t num_kv_heads, size_t seq_len, const uint32_t *indices,
                                                      size_t num_indices, kvsieve_selection_t **out);

/**
 * \brief StreamingLLM: every head reads the first `sinks` tokens (attention sinks) and the
 * last `window` tokens; the two ranges merge when they overlap, and a sequence shorter than
 * `sinks + window` is read whole.
 *
 * \param num_kv_heads At least 1.
 * \param seq_len Tokens in the sequence.
 * \param sinks First tokens kept; 0 gives a plain sliding window.
 * \param window Last tokens kept, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `window`).
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_streaming(size_t num_kv_heads, size_t seq_len, size_t sinks, size_t window,
                                             kvsieve_selection_t **out);

/**
 * \brief LM-Infinite's Λ-shaped mask for the sequence's last query: every head reads the
 * first `global` tokens and the last `local` tokens. Attention should then cap distances
 * (#KVSIEVE_POSITIONS_CAPPED).
 *
 * \param num_kv_heads At least 1.
 * \param seq_len Tokens in the sequence.
 * \param global First tokens kept; may be 0.
 * \param local Last tokens kept, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `local`).
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_lambda(size_t num_kv_heads, size_t seq_len, size_t global, size_t local,
                                          kvsieve_selection_t **out);

/**
 * \brief Per head, the tokens read by either selection.
 *
 * \param selection A selection (required).
 * \param other A selection of the same `num_kv_heads` and `seq_len` (required;
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `other` otherwise).
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the inputs stay owned by the caller; the caller owns `*out` (release with
 * kvsieve_selection_free()) and frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_union(const kvsieve_selection_t *selection, const kvsieve_selection_t *other,
                                         kvsieve_selection_t **out);

/**
 * \brief Per head, the tokens read by both selections.
 *
 * \param selection A selection (required).
 * \param other A selection of the same `num_kv_heads` and `seq_len` (required).
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the inputs stay owned by the caller; the caller owns `*out` (release with
 * kvsieve_selection_free()) and frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_intersection(const kvsieve_selection_t *selection, const kvsieve_selection_t *other,
                                                kvsieve_selection_t **out);

/**
 * \brief Release a selection.
 *
 * \param selection A selection, or NULL (ignored). Ownership: taken; the handle must not be
 *        used afterwards.
 *
 * Thread safety: not thread-safe with respect to `selection`: no other call on it may be
 * running or start afterwards.
 */
void kvsieve_selection_free(kvsieve_selection_t *selection);

/**
 * \brief Number of KV heads of a selection.
 *
 * \param selection The selection (required).
 * \param out Receives the count (required); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_num_kv_heads(const kvsieve_selection_t *selection, size_t *out);

/**
 * \brief Tokens in the sequence a selection was made for.
 *
 * \param selection The selection (required).
 * \param out Receives the length (required); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_seq_len(const kvsieve_selection_t *selection, size_t *out);

/**
 * \brief Selected tokens summed over heads: the length of the indices array
 * (`head_indptr[num_kv_heads]`).
 *
 * \param selection The selection (required).
 * \param out Receives the count (required); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_len(const kvsieve_selection_t *selection, size_t *out);

/**
 * \brief Copy a selection's CSR offsets out: `num_kv_heads + 1` values.
 *
 * \param selection The selection (required).
 * \param head_indptr Caller buffer of `capacity` values (NULL only if `capacity` is 0).
 * \param capacity Its length; fewer than `num_kv_heads + 1` gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written).
 * \param out_len Optional: receives the number of values written.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_head_indptr(const kvsieve_selection_t *selection, uint32_t *head_indptr,
                                               size_t capacity, size_t *out_len);

/**
 * \brief Copy every head's token indices out, concatenated in head order (kvsieve_selection_len()
 * values).
 *
 * \param selection The selection (required).
 * \param indices Caller buffer of `capacity` values (NULL only if `capacity` is 0).
 * \param capacity Its length; too small gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `capacity` (nothing is written).
 * \param out_len Optional: receives the number of values written.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_indices(const kvsieve_selection_t *selection, uint32_t *indices, size_t capacity,
                                           size_t *out_len);

/**
 * \brief Copy the token indices one KV head reads out (strictly ascending).
 *
 * \param selection The selection (required).
 * \param head KV head, below num_kv_heads (#KVSIEVE_ERROR_OUT_OF_RANGE naming `head` otherwise).
 * \param indices Caller buffer of `capacity` values (NULL only if `capacity` is 0). The head's
 *        count is `head_indptr[head+1] - head_indptr[head]`, or its entry of
 *        kvsieve_selection_stats()'s `per_head`.
 * \param capacity Its length; too small gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `capacity` (nothing is written).
 * \param out_len Optional: receives the number of values written.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_head(const kvsieve_selection_t *selection, size_t head, uint32_t *indices,
                                        size_t capacity, size_t *out_len);

/**
 * \brief Kept-token counts and densities of a selection.
 *
 * \param selection The selection (required).
 * \param out Receives the statistics (required), initialised by the caller with
 *        kvsieve_selection_stats_init() (kvsieve writes the fields its `struct_size` covers);
 *        untouched on failure.
 * \param per_head Optional: receives the count of each KV head (`num_kv_heads` values).
 * \param per_head_capacity Length of `per_head`; fewer than num_kv_heads gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `per_head_capacity`. Ignored when `per_head`
 *        is NULL.
 *
 * Ownership: the results are copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_selection_stats(const kvsieve_selection_t *selection, kvsieve_selection_stats_t *out,
                                         size_t *per_head, size_t per_head_capacity);

/**
 * \brief Settings of page-bound selection (Quest). Initialise with
 * kvsieve_page_bounds_config_init(), then set `budget_tokens`.
 *
 * - `struct_size`: set by kvsieve_page_bounds_config_init() (a versioned struct: see the
 *   conventions in kvsieve.h).
 * - `budget_tokens`: tokens to keep per KV head, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `budget_tokens` otherwise). Pages are taken best first until the kept tokens
 *   reach the budget, so a head keeps less than one page more than the budget; a sequence no
 *   longer than the budget is kept whole.
 * - `min_pages`: pages kept per KV head whatever the budget (capped at the page count).
 */
typedef struct kvsieve_page_bounds_config {
    size_t struct_size;
    size_t budget_tokens;
    size_t min_pages;
} kvsieve_page_bounds_config_t;

/**
 * \brief Initialise page-bound settings: `budget_tokens` 0 (set it), `min_pages` 0,
 * `struct_size` set.
 *
 * Ownership: writes `*config` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_page_bounds_config_init(kvsieve_page_bounds_config_t *config) {
    memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
}

/**
 * \brief Page-bound selection (Quest) for a decode query: pages ranked, per KV head, by an
 * upper bound of the query's logits over each page (from the page key bounds; for GQA the
 * largest bound over the group's query heads), whole pages kept best first to the budget.
 *
 * \param cache The cache (required); created with `track_key_bounds` and post-RoPE keys
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT otherwise).
 * \param seq The sequence.
 * \param layer Layer index.
 * \param q The sequence's query, `[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`,
 *        any accepted dtype and strides; num_qo_heads a positive multiple of num_kv_heads.
 * \param config The settings (required); copied.
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error; nothing else is retained.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_selection_page_bounds(const kvsieve_cache_t *cache, uint64_t seq, size_t layer,
                                               const kvsieve_tensor_t *q, const kvsieve_page_bounds_config_t *config,
                                               kvsieve_selection_t **out);

/**
 * \brief Spans (ReAttention): grow ranked hit tokens into spans of their neighbours, up to a
 * budget, as the `span=` policy item does. The span of hit `t` is the tokens
 * `t - (span - 1) / 2 ..= t + span / 2` inside `0..seq_len`. Hits are taken in order (best
 * first); each adds the tokens of its span that are neither taken yet nor in
 * `read_anyway`, nearest to the hit first (a tie: the earlier token), until `budget` tokens
 * are taken. Hits at or past `seq_len` are ignored.
 *
 * \param hits `num_hits` token indices, best first (NULL only if `num_hits` is 0).
 * \param num_hits Number of hits.
 * \param span Tokens per span, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `span`
 *        otherwise); 1 keeps the hits themselves.
 * \param budget Most tokens to take.
 * \param seq_len The sequence length.
 * \param read_anyway Strictly ascending tokens read in any case (sinks, window), neither
 *        taken nor counted (NULL only if `num_read_anyway` is 0).
 * \param num_read_anyway Their number.
 * \param out Receives the tokens taken, ascending; must not overlap the inputs.
 * \param capacity Its length; too small gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `capacity` (`min(budget, seq_len)` is always enough; nothing is written).
 * \param out_len Optional: receives the number of tokens written; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_expand_spans(const uint32_t *hits, size_t num_hits, size_t span, size_t budget, size_t seq_len,
                                      const uint32_t *read_anyway, size_t num_read_anyway, uint32_t *out,
                                      size_t capacity, size_t *out_len);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_SELECTION_H */
