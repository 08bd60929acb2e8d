/**
 * \file kvsieve/view.h
 *
 * \brief Views: descriptors of paged K/V memory the engine owns, with a batch's page
 * table, and dense and sparse decode and prefill over them without copying.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_VIEW_H
#define KVSIEVE_VIEW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "error.h"
#include "tensor.h"
#include "selection.h"
#include "attention.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief One layer of paged K/V memory owned by the engine, with a batch's CSR page table.
 * Nothing is copied: kvsieve reads the memory during the call that receives the descriptor.
 * Initialise with kvsieve_paged_kv_init(), then set the fields.
 *
 * Element (page, slot, head, channel) of K is at element offset
 * `page * k_strides[0] + slot * k_strides[1] + head * k_strides[2] + channel` from `k`
 * (likewise V with `v_strides`); strides are in elements, non-negative, the channel stride is
 * 1. A packed NHD layout has strides `{page_size * num_kv_heads * head_dim,
 * num_kv_heads * head_dim, head_dim}`; HND `{page_size * num_kv_heads * head_dim, head_dim,
 * page_size * head_dim}`.
 *
 * - `struct_size`: set by kvsieve_paged_kv_init() (a versioned struct: see the conventions
 *   in kvsieve.h); also before kvsieve_cuda_cache_layer_view() fills a descriptor.
 * - `k`, `v`: aligned to the element size and valid for every element of pages
 *   `0 .. num_pages` (NULL only if `num_pages` is 0).
 * - `device`: #KVSIEVE_DEVICE_CPU (for the `kvsieve_cuda_paged_*` functions
 *   #KVSIEVE_DEVICE_CUDA, and then every pointer, the page table's included, is a device
 *   address). `dtype`: float32, float16 or bfloat16 (float16 or bfloat16 on CUDA).
 * - `key_rope`: a ::kvsieve_key_rope_t value.
 * - `page_size` 1..1024, `head_dim` a multiple of 8 up to 512, `num_kv_heads` >= 1.
 * - Page table (required): `indptr` has `batch + 1` values, `indices` has `indptr[batch]`
 *   page ids, each below `num_pages`, `last_page_len` has `batch` values in 1..page_size
 *   (0 for a sequence without pages). Checked on every call; a page id past the memory
 *   gives #KVSIEVE_ERROR_OUT_OF_RANGE naming `indices[i]`.
 * - `positions`: optional; `num_pages * page_size` original positions indexed
 *   `page * page_size + slot`. Without them, a token's position is its index in its sequence.
 *
 * Ownership: the engine owns the descriptor and everything it points to. Nobody may write
 * the memory the table reaches during a call that reads it.
 */
typedef struct kvsieve_paged_kv {
    size_t struct_size;
    const void *k;
    const void *v;
    kvsieve_device_t device;
    kvsieve_dtype_t dtype;
    uint32_t key_rope;
    size_t num_pages;
    size_t page_size;
    size_t num_kv_heads;
    size_t head_dim;
    int64_t k_strides[3];
    int64_t v_strides[3];
    size_t batch;
    const int32_t *indptr;
    const int32_t *indices;
    const int32_t *last_page_len;
    const int32_t *positions;
} kvsieve_paged_kv_t;

/**
 * \brief Initialise a descriptor: host memory (#KVSIEVE_DEVICE_CPU, device 0), keys stored
 * after RoPE, every other field 0 or NULL, `struct_size` set.
 *
 * Ownership: writes `*kv` (required); nothing to free. Thread safety: thread-safe.
 * Defined here (`static inline`), so `struct_size` is the size this program was compiled with.
 */
static inline void kvsieve_paged_kv_init(kvsieve_paged_kv_t *kv) {
    memset(kv, 0, sizeof(*kv));
    kv->struct_size = sizeof(*kv);
    kv->k = NULL;
    kv->v = NULL;
    kv->device.device_type = KVSIEVE_DEVICE_CPU;
    kv->device.device_id = 0;
    kv->indptr = NULL;
    kv->indices = NULL;
    kv->last_page_len = NULL;
    kv->positions = NULL;
}

/**
 * \brief Decode attention over engine-owned paged memory: one query token per sequence of
 * the descriptor's page table. Shapes and parameters as in kvsieve_cache_decode(), with
 * `batch = kv->batch`.
 *
 * \param kv The descriptor (required), validated on every call.
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param out Output, same shape; must not overlap `q` or the memory `kv` describes.
 * \param lse Optional: `batch * num_qo_heads` floats.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_paged_decode(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *q,
                                      const kvsieve_tensor_t *out, float *lse,
                                      const kvsieve_attention_params_t *params);

/**
 * \brief Prefill attention over engine-owned paged memory. Shapes and parameters as in
 * kvsieve_cache_prefill(), with `batch = kv->batch`.
 *
 * \param kv The descriptor (required).
 * \param q Queries `[total, num_qo_heads, head_dim]`.
 * \param qo_indptr `kv->batch + 1` row offsets (required).
 * \param causal Causal mask.
 * \param out Output, same shape; must not overlap the inputs.
 * \param lse Optional: `total * num_qo_heads` floats.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_paged_prefill(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *q,
                                       const int32_t *qo_indptr, bool causal, const kvsieve_tensor_t *out, float *lse,
                                       const kvsieve_attention_params_t *params);

/**
 * \brief Sparse decode over engine-owned paged memory: as kvsieve_cache_decode_sparse(), with
 * `batch = kv->batch` and token indices counting each sequence's tokens in page-table order.
 *
 * \param kv The descriptor (required).
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param selections `kv->batch` selection handles (required), entry b made for sequence b's
 *        length.
 * \param out Output, same shape; must not overlap `q` or the memory `kv` describes.
 * \param lse Optional: `batch * num_qo_heads` floats.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: nothing is retained; the selections stay owned by the caller. Thread safety:
 * thread-safe.
 */
kvsieve_error_t *kvsieve_paged_decode_sparse(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *q,
                                             kvsieve_selection_t *const *selections, const kvsieve_tensor_t *out,
                                             float *lse, const kvsieve_attention_params_t *params);

/**
 * \brief Sparse causal prefill over engine-owned paged memory: as kvsieve_cache_prefill_sparse(),
 * with `batch = kv->batch`.
 *
 * \param kv The descriptor (required).
 * \param q Queries `[total, num_qo_heads, head_dim]`.
 * \param qo_indptr `kv->batch + 1` row offsets (required).
 * \param selections `kv->batch` selection handles (required).
 * \param windows Optional: `num_windows` entries (0 or `kv->num_kv_heads`); see
 *        ::kvsieve_streaming_window_t.
 * \param num_windows Length of `windows`.
 * \param out Output, same shape; must not overlap the inputs.
 * \param lse Optional: `total * num_qo_heads` floats.
 * \param params Optional (NULL = defaults).
 *
 * Ownership: nothing is retained; the selections and windows stay owned by the caller.
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_paged_prefill_sparse(const kvsieve_paged_kv_t *kv, const kvsieve_tensor_t *q,
                                              const int32_t *qo_indptr, kvsieve_selection_t *const *selections,
                                              const kvsieve_streaming_window_t *windows, size_t num_windows,
                                              const kvsieve_tensor_t *out, float *lse,
                                              const kvsieve_attention_params_t *params);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_VIEW_H */
