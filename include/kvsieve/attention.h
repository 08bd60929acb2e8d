/**
 * \file kvsieve/attention.h
 *
 * \brief Attention: its parameters (scale, soft cap, RoPE, position modes), RoPE and
 * merging of partial results, and dense and sparse decode and prefill over a cache.
 * Attention allocates its work space (scaled queries, one partial result per chunk of
 * `chunk_size` tokens and query head, the merged rows) fallibly and before writing any
 * output: when memory runs out the call fails with #KVSIEVE_ERROR_OUT_OF_MEMORY and `out`
 * and `lse` are untouched.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_ATTENTION_H
#define KVSIEVE_ATTENTION_H

#include <stdbool.h>
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

/** \brief How RoPE pairs channels. */
typedef enum kvsieve_rope_style {
    /** Channel i pairs with i + rotary_dim/2 (GPT-NeoX, Hugging Face Llama). */
    KVSIEVE_ROPE_HALF_SPLIT = 0,
    /** Channel 2i pairs with 2i + 1 (GPT-J, GGUF / llama.cpp Llama). */
    KVSIEVE_ROPE_ADJACENT_PAIRS = 1
} kvsieve_rope_style_t;

/**
 * \brief Rotary position embedding parameters. Initialise with kvsieve_rope_config_init(),
 * then set `theta` (and the fields that differ from their defaults).
 *
 * Pair i (0 <= i < rotary_dim/2) of a token at position p rotates by the angle
 * `(p / position_scale) * theta^(-2i / rotary_dim)`; channels past `rotary_dim` are left
 * as they are.
 *
 * - `struct_size`: set by kvsieve_rope_config_init() (a versioned struct: see the
 *   conventions in kvsieve.h).
 * - `theta`: base of the frequencies, finite and > 1 (for example 10000); no default.
 * - `rotary_dim`: rotated channels, even and <= head_dim; 0 means all of head_dim.
 * - `style`: a ::kvsieve_rope_style_t value.
 * - `position_scale`: linear position scaling, finite and > 0; 0 means 1 (none).
 */
typedef struct kvsieve_rope_config {
    size_t struct_size;
    float theta;
    uint32_t rotary_dim;
    uint32_t style;
    float position_scale;
} kvsieve_rope_config_t;

/**
 * \brief Initialise RoPE parameters: `theta` 0 (set it), all of head_dim rotated,
 * #KVSIEVE_ROPE_HALF_SPLIT, no position scaling, `struct_size` set.
 *
 * Ownership: writes `*rope` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_rope_config_init(kvsieve_rope_config_t *rope) {
    memset(rope, 0, sizeof(*rope));
    rope->struct_size = sizeof(*rope);
    rope->style = KVSIEVE_ROPE_HALF_SPLIT;
}

/** \brief How positions are numbered when RoPE is applied at read time (pre-RoPE keys). */
typedef enum kvsieve_position_mode {
    /** Every key at the position stored in its slot, the query at its own token's stored
     *  position. The only mode for keys stored after RoPE. */
    KVSIEVE_POSITIONS_ORIGINAL = 0,
    /** StreamingLLM: the tokens a KV head reads are renumbered 0, 1, ... in cache order and
     *  the query sits right after its predecessors, whatever was evicted in between. */
    KVSIEVE_POSITIONS_CONTIGUOUS = 1,
    /** LM-Infinite: the relative distance between query and key is capped at
     *  `max_distance` (>= 1). */
    KVSIEVE_POSITIONS_CAPPED = 2
} kvsieve_position_mode_t;

/**
 * \brief Parameters of decode and prefill. Initialise with kvsieve_attention_params_init(),
 * which gives every default (as does a NULL pointer where one is accepted), then change
 * fields.
 *
 * - `struct_size`: set by kvsieve_attention_params_init() (a versioned struct: see the
 *   conventions in kvsieve.h).
 * - `scale`: multiplier of q·k; 0 means 1/sqrt(head_dim). Must be finite.
 * - `logit_soft_cap`: if c > 0, scores become c * tanh(score / c) after scaling; 0 means off.
 * - `rope`: optional (NULL for none); borrowed for the call only, initialised with
 *   kvsieve_rope_config_init() (its own `struct_size` is checked; errors name `rope`).
 *   Required when the keys are stored before RoPE (#KVSIEVE_KEYS_PRE_ROPE), not used
 *   otherwise. Then the queries are given before RoPE too, and kvsieve rotates both: each
 *   key by its slot's stored position, each query by its token's position (in decode the
 *   query is the sequence's last token, in prefill query i of n is token
 *   `seq_len - n + i`), numbered by `position_mode`.
 * - `chunk_size`: tokens per work chunk when long sequences are split across threads;
 *   0 picks one.
 * - `position_mode`: a ::kvsieve_position_mode_t value; anything but
 *   #KVSIEVE_POSITIONS_ORIGINAL needs pre-RoPE keys and `rope`.
 * - `max_distance`: the cap of #KVSIEVE_POSITIONS_CAPPED; ignored by the other modes.
 */
typedef struct kvsieve_attention_params {
    size_t struct_size;
    float scale;
    float logit_soft_cap;
    const kvsieve_rope_config_t *rope;
    size_t chunk_size;
    uint32_t position_mode;
    uint32_t max_distance;
} kvsieve_attention_params_t;

/**
 * \brief Initialise attention parameters to every default: scale 1/sqrt(head_dim), no soft
 * cap, no RoPE, chunk size chosen by kvsieve, #KVSIEVE_POSITIONS_ORIGINAL; `struct_size` set.
 *
 * Ownership: writes `*params` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_attention_params_init(kvsieve_attention_params_t *params) {
    memset(params, 0, sizeof(*params));
    params->struct_size = sizeof(*params);
    params->rope = NULL;
    params->position_mode = KVSIEVE_POSITIONS_ORIGINAL;
}

/**
 * \brief Apply RoPE in place to `x`, token i at position `positions[i]`.
 *
 * \param x Tensor `[n, heads, head_dim]`, float32/float16/bfloat16, read and written in place.
 * \param positions `num_positions` int32 positions; `num_positions` must equal n.
 * \param num_positions Length of `positions`.
 * \param rope RoPE parameters (required), from kvsieve_rope_config_init(); validated against
 *        head_dim.
 * \return NULL on success, or an error (owned by the caller); `x` is unchanged on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe, provided nobody else uses
 * `x`'s memory during the call.
 */
kvsieve_error_t *kvsieve_apply_rope(const kvsieve_tensor_t *x, const int32_t *positions, size_t num_positions,
                                    const kvsieve_rope_config_t *rope);

/**
 * \brief Merge two partial attention results over disjoint key sets by their log-sum-exps:
 * the result equals attention over the union of the two key sets. A state whose LSE is
 * -inf (no keys) contributes nothing.
 *
 * \param v_a First normalised output, `[n, heads, head_dim]`, any accepted dtype.
 * \param lse_a Its natural-log LSEs, `n * heads` floats (`[n, heads]` row-major).
 * \param v_b Second output, same shape as `v_a`.
 * \param lse_b Its LSEs, `n * heads` floats.
 * \param out Merged output, same shape, any accepted dtype; must not overlap the inputs.
 * \param lse_out Merged LSEs, `n * heads` floats; must not overlap the inputs.
 * \return NULL on success, or an error (owned by the caller); outputs untouched on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_merge_states(const kvsieve_tensor_t *v_a, const float *lse_a, const kvsieve_tensor_t *v_b,
                                      const float *lse_b, const kvsieve_tensor_t *out, float *lse_out);

/* Attention on the cache --------------------------------------------------------------- */

/**
 * \brief Decode attention: one query token per sequence, over every token of the sequence,
 * at one layer. Grouped-query attention: query head h reads KV head
 * `h / (num_qo_heads / num_kv_heads)`.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[batch, num_qo_heads, head_dim]`, `num_qo_heads` a positive multiple of
 *        num_kv_heads; any accepted dtype and strides.
 * \param out Output, same shape as `q`, any accepted dtype; must not overlap `q`.
 * \param lse Optional: receives `batch * num_qo_heads` natural-log LSEs of the scaled
 *        scores (-inf for a sequence with no tokens, whose output is zero).
 * \param params Optional (NULL = defaults); see ::kvsieve_attention_params_t.
 * \return NULL on success, or an error (owned by the caller); `out` and `lse` untouched on failure.
 *
 * Ownership: kvsieve reads and writes the caller's tensors and buffers during the call
 * only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock): decodes run concurrently with each other and
 * with other readers. The work itself is spread over kvsieve's worker threads.
 */
kvsieve_error_t *kvsieve_cache_decode(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                      size_t batch, const kvsieve_tensor_t *q, const kvsieve_tensor_t *out, float *lse,
                                      const kvsieve_attention_params_t *params);

/**
 * \brief Prefill attention: the queries of each sequence's last tokens against the cache.
 *
 * Append and write the new tokens' K and V first. Rows `qo_indptr[b] .. qo_indptr[b+1]` of
 * `q` are the queries of sequence b's last `qo_indptr[b+1] - qo_indptr[b]` tokens. With
 * `causal`, query i of n sees tokens `0 ..= seq_len - n + i`; without, every token.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[total, num_qo_heads, head_dim]`, `total = qo_indptr[batch]`.
 * \param qo_indptr `batch + 1` row offsets (required), `qo_indptr[0] = 0`, non-decreasing.
 * \param causal Causal mask.
 * \param out Output, same shape as `q`; must not overlap `q`.
 * \param lse Optional: receives `total * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: kvsieve reads and writes the caller's tensors and buffers during the call
 * only and retains no pointer; the caller frees any returned error.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_prefill(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                       size_t batch, const kvsieve_tensor_t *q, const int32_t *qo_indptr, bool causal,
                                       const kvsieve_tensor_t *out, float *lse,
                                       const kvsieve_attention_params_t *params);

/* Sparse attention on the cache -------------------------------------------------------- */

/**
 * \brief Row mask of one KV head in sparse prefill (StreamingLLM's window, LM-Infinite's
 * Λ-mask): query token i sees token t only if `t < sinks` or `i - t < window`.
 *
 * An entry with `window` 0 means **no window** for that KV head (its queries see every
 * selected token up to themselves); its `sinks` must then be 0 too, so an entry from
 * kvsieve_streaming_window_init() is "no window". A window of 0 tokens cannot be asked for:
 * it would hide even the query's own token.
 *
 * `struct_size` is set by kvsieve_streaming_window_init() (a versioned struct: see the
 * conventions in kvsieve.h); every entry of an array has the same `struct_size`, and errors
 * name the entry (`windows[h].struct_size`).
 */
typedef struct kvsieve_streaming_window {
    size_t struct_size;
    size_t sinks;
    size_t window;
} kvsieve_streaming_window_t;

/**
 * \brief Initialise a window entry to "no window" (`sinks` and `window` 0), `struct_size`
 * set. Initialise every entry of an array.
 *
 * Ownership: writes `*window` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_streaming_window_init(kvsieve_streaming_window_t *window) {
    memset(window, 0, sizeof(*window));
    window->struct_size = sizeof(*window);
}

/**
 * \brief Sparse decode: like kvsieve_cache_decode(), but KV head h of `seq_ids[b]` reads
 * only the tokens of head h of `selections[b]` (query heads of a GQA group share them). The
 * result equals dense attention over exactly those tokens. With pre-RoPE keys and
 * #KVSIEVE_POSITIONS_CONTIGUOUS, the tokens a head reads are numbered 0, 1, ... in order.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param selections `batch` selection handles (the array and every entry required): entry b
 *        must have the cache's num_kv_heads (#KVSIEVE_ERROR_SHAPE) and be made for the
 *        sequence's current length (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `selections[b]`).
 * \param out Output, same shape as `q`; must not overlap `q`.
 * \param lse Optional: `batch * num_qo_heads` LSEs (-inf for a head that reads no token, whose
 *        output is zero).
 * \param params Optional (NULL = defaults).
 * \return NULL on success, or an error (owned by the caller); `out` and `lse` untouched on failure.
 *
 * Ownership: the selections stay owned by the caller; nothing is retained.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_decode_sparse(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                             size_t batch, const kvsieve_tensor_t *q,
                                             kvsieve_selection_t *const *selections, const kvsieve_tensor_t *out,
                                             float *lse, const kvsieve_attention_params_t *params);

/**
 * \brief Sparse causal prefill: like kvsieve_cache_prefill() with `causal`, but KV head h of
 * `seq_ids[b]` reads only head h of `selections[b]`, and with a window for h, query token i
 * sees only the sinks and its own last `window` tokens among them.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[total, num_qo_heads, head_dim]`, `total = qo_indptr[batch]`.
 * \param qo_indptr `batch + 1` row offsets (required).
 * \param selections `batch` selection handles (required), as in kvsieve_cache_decode_sparse().
 * \param windows Optional: `num_windows` entries, one per KV head, or NULL.
 * \param num_windows 0 (no windows) or num_kv_heads (#KVSIEVE_ERROR_SHAPE naming `windows`
 *        otherwise).
 * \param out Output, same shape as `q`; must not overlap the inputs.
 * \param lse Optional: `total * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: the selections and windows stay owned by the caller; nothing is retained.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cache_prefill_sparse(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                              size_t batch, const kvsieve_tensor_t *q, const int32_t *qo_indptr,
                                              kvsieve_selection_t *const *selections,
                                              const kvsieve_streaming_window_t *windows, size_t num_windows,
                                              const kvsieve_tensor_t *out, float *lse,
                                              const kvsieve_attention_params_t *params);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_ATTENTION_H */
