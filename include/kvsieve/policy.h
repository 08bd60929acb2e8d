/**
 * \file kvsieve/policy.h
 *
 * \brief Policies: a selection rule for every (layer, KV head) of a model, parsed from
 * text, and the cache calls that select, attend and evict under one.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_POLICY_H
#define KVSIEVE_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "tensor.h"
#include "cache.h"
#include "selection.h"
#include "attention.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief A selection policy for every (layer, KV head) of a model, parsed from its text
 * form. Opaque.
 *
 * Text form (whitespace allowed between tokens):
 * `spec ; layers=a-b,c:spec ; heads=layer.head,...:spec`, where a spec is `dense`, or a
 * comma-separated list of `sinks=N`, `window=N`, `pages=N` (page bounds to N tokens per KV
 * head), `min_pages=N`, `clusters=N` with `clusters_k=K` / `cluster_size=S`, `hier=C` and
 * `rank=estimate|mixed` (centroid retrieval; see ::kvsieve_cluster_set_t), `global=N` /
 * `local=N` (Λ-mask: sinks / window with capped positions), `topk=N` (the N tokens outside
 * the sinks and window whose stored keys score highest by raw q·k: position-free top-k),
 * `span=S` (each token retrieved by `topk`, `pages` or `clusters` grown into the S tokens
 * around it, best hit first, up to the item's budget),
 * `positions=original|contiguous|capped` and `max_distance=N`. The clause
 * without a prefix is the default (dense if absent); a head clause beats a layer clause,
 * and later clauses of one kind beat earlier ones. For example
 * `sinks=4,window=1024,pages=2048;layers=0-1:dense` keeps 4 sink tokens, the last 1024
 * tokens and the best pages up to 2048 tokens everywhere except layers 0 and 1, which are
 * dense. An empty text means dense everywhere.
 *
 * Made by kvsieve_policy_parse(), released by kvsieve_policy_free().
 *
 * Thread safety: a policy never changes once parsed. Any number of threads may use it at
 * once, with any caches; kvsieve_policy_free() must run alone.
 */
typedef struct kvsieve_policy kvsieve_policy_t;

/**
 * \brief Parse a policy from its text form. Checks syntax only; kvsieve_policy_validate()
 * checks it against a model.
 *
 * \param text NUL-terminated UTF-8 text (required).
 * \param out Receives the new policy (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller): #KVSIEVE_ERROR_PARSE for
 *         malformed text, whose message gives the byte offset of the token at fault and what
 *         was expected there (e.g. "window=x" fails at byte 7, "expected a number after
 *         `window=`"); kvsieve_error_parse_offset() returns that offset.
 *
 * Ownership: `text` is read during the call only; the caller owns `*out` and releases it
 * with kvsieve_policy_free().
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_policy_parse(const char *text, kvsieve_policy_t **out);

/**
 * \brief Release a policy.
 *
 * \param policy A policy, or NULL (ignored). Ownership: taken; the handle must not be used
 *        afterwards.
 *
 * Thread safety: not thread-safe with respect to `policy`: no other call on it may be
 * running or start afterwards.
 */
void kvsieve_policy_free(kvsieve_policy_t *policy);

/**
 * \brief The policy's canonical text form, which parses back to an equal policy: items in
 * the order `dense, sinks, window, pages, min_pages, clusters, clusters_k, cluster_size,
 * hier, rank, topk, span, positions, max_distance` (`global=` and
 * `local=` written as `sinks=`, `window=` and `positions=capped`), the default first, then
 * layer clauses, then head clauses, ranges sorted and merged.
 *
 * Two-step use: call with `buf` NULL to learn the size, allocate, call again.
 *
 * \param policy The policy (required).
 * \param buf Optional: receives the NUL-terminated text. NULL asks for the size only.
 * \param capacity Length of `buf` in bytes; with a `buf`, fewer than the size gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity`, and nothing is written.
 * \param out_size Receives the bytes the text needs, its NUL included (required when `buf`
 *        is NULL, optional otherwise); untouched on failure.
 *
 * Ownership: the result is copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_policy_to_string(const kvsieve_policy_t *policy, char *buf, size_t capacity,
                                          size_t *out_size);

/**
 * \brief Check a policy against a model of `num_layers` layers and `num_kv_heads` KV heads:
 * layers and heads in range (#KVSIEVE_ERROR_OUT_OF_RANGE), and per spec `window`, `pages`
 * and `max_distance` at least 1, something selected, `min_pages` only with `pages`, `capped`
 * positions with `max_distance` and `max_distance` only with them, and one position mode for
 * all heads of a layer (#KVSIEVE_ERROR_INVALID_ARGUMENT). Messages name the clause at fault.
 * The cache calls taking a policy run this check themselves.
 *
 * \param policy The policy (required).
 *
 * Ownership: the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_policy_validate(const kvsieve_policy_t *policy, size_t num_layers, size_t num_kv_heads);

/**
 * \brief The position mode attention uses at `layer` under a policy (that of the layer's
 * KV head 0; a valid policy gives all heads of a layer the same). The calls that attend
 * under a policy apply it themselves; engines running their own attention use this.
 *
 * \param policy The policy (required).
 * \param layer A layer; the policy does not know the model's depth, so a layer no clause
 *        names gets the default spec's mode.
 * \param out_mode Receives a ::kvsieve_position_mode_t value (required); untouched on failure.
 * \param out_max_distance Optional: receives the cap of #KVSIEVE_POSITIONS_CAPPED (UINT32_MAX
 *        when a policy that fails validation gives none), 0 for the other modes.
 *
 * Ownership: the results are copied into caller memory; the caller frees any returned error.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_policy_position_mode(const kvsieve_policy_t *policy, size_t layer, uint32_t *out_mode,
                                              uint32_t *out_max_distance);

/**
 * \brief The tokens a policy has each KV head of `layer` read for the decode query `q` of
 * sequence `seq`: per head, every token if its spec is dense, else the union of its sinks,
 * window, page-bound and `topk=` parts (grown into spans with `span=`).
 *
 * \param policy The policy (required); validated against the cache's shape.
 * \param cache The cache (required). Page bounds need `track_key_bounds` and post-RoPE keys.
 * \param seq The sequence.
 * \param layer Layer index (#KVSIEVE_ERROR_OUT_OF_RANGE naming `layer` if past num_layers).
 * \param q The sequence's query, `[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`,
 *        any accepted dtype and strides.
 * \param out Receives the new selection (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()) and frees any
 * returned error; nothing else is retained.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_policy_select(const kvsieve_policy_t *policy, const kvsieve_cache_t *cache, uint64_t seq,
                                       size_t layer, const kvsieve_tensor_t *q, kvsieve_selection_t **out);

/* Attention under a policy ------------------------------------------------------------- */

/**
 * \brief Decode under a policy: per sequence, kvsieve_policy_select() picks each KV head's
 * tokens for that sequence's query, then sparse decode reads exactly those. A layer whose
 * heads are all dense runs dense decode.
 *
 * The policy's position mode for the layer (kvsieve_policy_position_mode()) replaces
 * `params->position_mode` and `params->max_distance`; the rest of `params` applies.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param policy The policy (required); validated against the cache's shape.
 * \param out Output, same shape as `q`.
 * \param lse Optional: `batch * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 * \param out_selections Optional: an array of `batch` slots that receives, per sequence, a
 *        new handle to the selection that was read, or NULL in every slot when the layer is
 *        dense. NULL discards the selections. Untouched on failure.
 *
 * Ownership: the caller owns every handle written to `out_selections` and releases each with
 * kvsieve_selection_free(); nothing else is retained.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_decode_with_policy(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                                  size_t batch, const kvsieve_tensor_t *q,
                                                  const kvsieve_policy_t *policy, const kvsieve_tensor_t *out,
                                                  float *lse, const kvsieve_attention_params_t *params,
                                                  kvsieve_selection_t **out_selections);

/**
 * \brief Causal prefill under a policy. Per KV head of `layer`: a spec made of sinks and a
 * window alone masks each query row to the sinks and its own last `window` tokens (as a
 * ::kvsieve_streaming_window_t); any other spec (dense, or with page bounds, which choose
 * tokens per decode query) attends every earlier token. Under `positions=contiguous` a
 * sparse spec instead reads, per call (a chunk of new tokens), its sinks, the `window - 1`
 * tokens before the chunk, the chunk itself (causally) and, with `topk=`, the best tokens
 * for the chunk's queries (per query head its mean over the chunk; in spans with `span=`),
 * numbered contiguously over that list (InfLLM's chunk rule): a one-token chunk reads
 * exactly what decode reads, and a chunk's attention reads a bounded number of tokens
 * (`topk=` adds a scan of the keys). Results depend on the chunk size: keep chunks at most
 * the window. The
 * policy's position mode for the layer replaces `params->position_mode` and
 * `params->max_distance`.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[total, num_qo_heads, head_dim]`.
 * \param qo_indptr `batch + 1` row offsets (required).
 * \param policy The policy (required); validated against the cache's shape.
 * \param out Output, same shape as `q`.
 * \param lse Optional: `total * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: nothing is retained; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_prefill_with_policy(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                                   size_t batch, const kvsieve_tensor_t *q, const int32_t *qo_indptr,
                                                   const kvsieve_policy_t *policy, const kvsieve_tensor_t *out,
                                                   float *lse, const kvsieve_attention_params_t *params);

/* Memory under a policy ---------------------------------------------------------------- */

/**
 * \brief Evict the pages of a sequence that a policy never reads again, so memory stays
 * bounded however long the stream. Only a policy whose every (layer, head) spec is made of
 * sinks and a window alone has such pages: those whose tokens all lie outside the largest
 * sinks and the largest window (the page holding the last token is always kept); for any
 * other policy nothing is evicted. Remaining tokens keep their original positions; token
 * indices after an evicted page shift down, so selections made before go stale.
 *
 * \param cache The cache (required).
 * \param seq The sequence.
 * \param policy The policy (required); validated against the cache's shape.
 * \param out_pages_evicted Optional: receives the number of pages evicted; untouched on failure.
 *
 * Ownership: the caller frees any returned error.
 *
 * Thread safety: thread-safe (exclusive lock).
 */
kvsieve_error_t *kvsieve_cache_evict_for_policy(kvsieve_cache_t *cache, uint64_t seq, const kvsieve_policy_t *policy,
                                                size_t *out_pages_evicted);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_POLICY_H */
