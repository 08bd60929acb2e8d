/**
 * \file kvsieve.h
 *
 * \brief C API of kvsieve: a paged KV cache and CPU attention for LLM inference engines.
 *
 * Conventions used by every function in this header:
 *
 * - **Errors.** A function that can fail returns `kvsieve_error_t*`: NULL on success,
 *   otherwise an error object that the caller owns and must release with
 *   kvsieve_error_free(). A call that fails changes nothing: out-parameters and output
 *   buffers are left untouched and the cache is exactly as it was.
 * - **Pointers.** Every pointer argument is checked; a NULL where a value is required gives
 *   #KVSIEVE_ERROR_NULL_POINTER with a message naming the parameter. Parameters documented
 *   as optional accept NULL. A buffer of length 0 may be NULL. Buffers are never retained
 *   after a call returns.
 * - **Overlap.** A buffer that a call writes must not overlap any buffer the same call
 *   reads or writes (checked over the bytes each spans; an error otherwise).
 * - **Panics.** Nothing in kvsieve aborts the host process: an internal failure is reported
 *   as #KVSIEVE_ERROR_INTERNAL.
 * - **Threads.** Functions without a handle are thread-safe. A ::kvsieve_cache_t may be used
 *   from any number of threads at once: calls that only read it (queries, statistics, page
 *   table export, decode and prefill) take a shared lock and run concurrently; calls that
 *   change it take an exclusive lock and wait for the readers. kvsieve_cache_free() is the
 *   exception: no other call on that cache may be running or start afterwards.
 * - **Tensors.** ::kvsieve_tensor_t has the layout of DLPack's `DLTensor` (host memory
 *   only for now). kvsieve reads and writes through descriptors only during a call.
 */

#ifndef KVSIEVE_H
#define KVSIEVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** \brief Major version of this header. Compare with kvsieve_version_major(). */
#define KVSIEVE_VERSION_MAJOR 0
/** \brief Minor version of this header. Compare with kvsieve_version_minor(). */
#define KVSIEVE_VERSION_MINOR 1
/** \brief Patch version of this header. Compare with kvsieve_version_patch(). */
#define KVSIEVE_VERSION_PATCH 0
/** \brief Version of this header as a string. */
#define KVSIEVE_VERSION "0.1.0"

/* ------------------------------------------------------------------------------------ */
/* Version                                                                               */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief The library's version, "MAJOR.MINOR.PATCH".
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_version(void);

/**
 * \brief The library's major version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_major(void);

/**
 * \brief The library's minor version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_minor(void);

/**
 * \brief The library's patch version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_patch(void);

/**
 * \brief The SIMD instruction set the CPU kernels use on this machine, chosen at run time
 * (for example "avx2+fma+f16c" or "portable").
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_isa(void);

/* ------------------------------------------------------------------------------------ */
/* Errors                                                                                */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief Stable numeric error codes. Values never change once released; new kinds of
 * error get new values.
 */
typedef enum kvsieve_error_code {
    /** No error (what kvsieve_error_code() returns for NULL). */
    KVSIEVE_OK = 0,
    /** An argument has a value outside what the call accepts. */
    KVSIEVE_ERROR_INVALID_ARGUMENT = 1,
    /** A tensor has the wrong shape or strides. */
    KVSIEVE_ERROR_SHAPE = 2,
    /** A tensor has a dtype the call does not accept. */
    KVSIEVE_ERROR_DTYPE = 3,
    /** A required pointer was NULL. */
    KVSIEVE_ERROR_NULL_POINTER = 4,
    /** A sequence id that the cache does not hold. */
    KVSIEVE_ERROR_UNKNOWN_SEQUENCE = 5,
    /** An index (token, slot, page, layer, head) is out of range. */
    KVSIEVE_ERROR_OUT_OF_RANGE = 6,
    /** The page pool has too few free pages for the request. */
    KVSIEVE_ERROR_OUT_OF_PAGES = 7,
    /** A configuration the library does not support (a head_dim, a device). */
    KVSIEVE_ERROR_UNSUPPORTED = 8,
    /** The CUDA driver or device is not available. */
    KVSIEVE_ERROR_CUDA_UNAVAILABLE = 9,
    /** Reading or writing a file failed, or its contents are malformed. */
    KVSIEVE_ERROR_IO = 10,
    /** Text (such as a policy) could not be parsed. */
    KVSIEVE_ERROR_PARSE = 11,
    /** A bug inside kvsieve (including a caught panic). Please report it. */
    KVSIEVE_ERROR_INTERNAL = 12
} kvsieve_error_code_t;

/**
 * \brief An error returned by a fallible call. Opaque.
 *
 * Ownership: owned by the caller, who releases it with kvsieve_error_free().
 * Thread safety: an error may be read from any thread, and freed from any thread once
 * nobody reads it.
 */
typedef struct kvsieve_error kvsieve_error_t;

/**
 * \brief The error's message: the name of the function that failed, then what went wrong,
 * naming the parameter at fault and what was expected, e.g.
 * "kvsieve_cache_write: bad shape for `k`: expected [4, 2, 64], got [4, 2, 32]".
 *
 * \param error An error, or NULL (gives "").
 * \return A NUL-terminated UTF-8 string.
 *
 * Ownership: the string is borrowed from `error` and valid until kvsieve_error_free(error);
 * do not free it.
 *
 * Thread safety: thread-safe.
 */
const char *kvsieve_error_message(const kvsieve_error_t *error);

/**
 * \brief The error's stable code (a ::kvsieve_error_code_t value).
 *
 * \param error An error, or NULL (gives #KVSIEVE_OK).
 *
 * Ownership: `error` stays owned by the caller.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_code_t kvsieve_error_code(const kvsieve_error_t *error);

/**
 * \brief Release an error.
 *
 * \param error An error returned by kvsieve, or NULL (ignored). Ownership: taken; the
 *        error and its message must not be used afterwards.
 *
 * Thread safety: thread-safe for distinct errors.
 */
void kvsieve_error_free(kvsieve_error_t *error);

/**
 * \brief Short lowercase name of an error code ("ok", "null_pointer", "out_of_pages", ...);
 * "unknown" for a value kvsieve does not define.
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_error_code_name(kvsieve_error_code_t code);

/* ------------------------------------------------------------------------------------ */
/* Tensors (DLPack layout)                                                               */
/* ------------------------------------------------------------------------------------ */

/** \brief DLPack device types kvsieve knows (`DLDeviceType`). */
typedef enum kvsieve_device_type {
    /** Host memory (`kDLCPU`). The only device accepted for now. */
    KVSIEVE_DEVICE_CPU = 1,
    /** CUDA device memory (`kDLCUDA`); rejected with #KVSIEVE_ERROR_UNSUPPORTED for now. */
    KVSIEVE_DEVICE_CUDA = 2
} kvsieve_device_type_t;

/** \brief DLPack type codes kvsieve accepts (`DLDataTypeCode`). */
typedef enum kvsieve_dtype_code {
    /** IEEE floating point (`kDLFloat`): bits 32 (float32) or 16 (float16). */
    KVSIEVE_DTYPE_CODE_FLOAT = 2,
    /** bfloat16 (`kDLBfloat`): bits 16. */
    KVSIEVE_DTYPE_CODE_BFLOAT = 4
} kvsieve_dtype_code_t;

/**
 * \brief A device, laid out like DLPack's `DLDevice`.
 *
 * `device_type` takes a ::kvsieve_device_type_t value; `device_id` is 0 for the CPU.
 */
typedef struct kvsieve_device {
    int32_t device_type;
    int32_t device_id;
} kvsieve_device_t;

/**
 * \brief An element type, laid out like DLPack's `DLDataType`.
 *
 * Accepted: float32 `{KVSIEVE_DTYPE_CODE_FLOAT, 32, 1}`, float16
 * `{KVSIEVE_DTYPE_CODE_FLOAT, 16, 1}` and bfloat16 `{KVSIEVE_DTYPE_CODE_BFLOAT, 16, 1}`;
 * anything else gives #KVSIEVE_ERROR_DTYPE. Initialisers: #KVSIEVE_DTYPE_F32,
 * #KVSIEVE_DTYPE_F16, #KVSIEVE_DTYPE_BF16.
 */
typedef struct kvsieve_dtype {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} kvsieve_dtype_t;

/** \brief Initialiser of a float32 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_F32 {KVSIEVE_DTYPE_CODE_FLOAT, 32, 1}
/** \brief Initialiser of a float16 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_F16 {KVSIEVE_DTYPE_CODE_FLOAT, 16, 1}
/** \brief Initialiser of a bfloat16 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_BF16 {KVSIEVE_DTYPE_CODE_BFLOAT, 16, 1}

/**
 * \brief A borrowed tensor, laid out exactly like DLPack's `DLTensor`, so that
 * `&managed->dl_tensor` of a `DLManagedTensor` can be passed (cast) as is.
 *
 * - `data`: first byte of the allocation; the first element is at `data + byte_offset`.
 *   May be NULL only if the tensor has no elements.
 * - `device`: must be #KVSIEVE_DEVICE_CPU for now.
 * - `ndim`, `shape`: each function states the shape it expects; sizes are non-negative.
 * - `strides`: in elements, one per dimension, non-negative; NULL means contiguous
 *   row-major. Any stride is accepted, including for the last dimension.
 *
 * Ownership: the caller owns the descriptor and the memory it points to; kvsieve reads
 * (or, for outputs, writes) it only during the call that receives it.
 */
typedef struct kvsieve_tensor {
    void *data;
    kvsieve_device_t device;
    int32_t ndim;
    kvsieve_dtype_t dtype;
    const int64_t *shape;
    const int64_t *strides;
    uint64_t byte_offset;
} kvsieve_tensor_t;

/* ------------------------------------------------------------------------------------ */
/* Attention parameters and RoPE                                                         */
/* ------------------------------------------------------------------------------------ */

/** \brief How RoPE pairs channels. */
typedef enum kvsieve_rope_style {
    /** Channel i pairs with i + rotary_dim/2 (GPT-NeoX, Hugging Face Llama). */
    KVSIEVE_ROPE_HALF_SPLIT = 0,
    /** Channel 2i pairs with 2i + 1 (GPT-J, GGUF / llama.cpp Llama). */
    KVSIEVE_ROPE_ADJACENT_PAIRS = 1
} kvsieve_rope_style_t;

/**
 * \brief Rotary position embedding parameters.
 *
 * Pair i (0 <= i < rotary_dim/2) of a token at position p rotates by the angle
 * `(p / position_scale) * theta^(-2i / rotary_dim)`; channels past `rotary_dim` are left
 * as they are.
 *
 * - `theta`: base of the frequencies, finite and > 1 (for example 10000).
 * - `rotary_dim`: rotated channels, even and <= head_dim; 0 means all of head_dim.
 * - `style`: a ::kvsieve_rope_style_t value.
 * - `position_scale`: linear position scaling, finite and > 0; 0 means 1 (none).
 */
typedef struct kvsieve_rope_config {
    float theta;
    uint32_t rotary_dim;
    uint32_t style;
    float position_scale;
} kvsieve_rope_config_t;

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
 * \brief Parameters of decode and prefill. A zero-initialised struct (or a NULL pointer
 * where one is accepted) means every default.
 *
 * - `scale`: multiplier of q·k; 0 means 1/sqrt(head_dim). Must be finite.
 * - `logit_soft_cap`: if c > 0, scores become c * tanh(score / c) after scaling; 0 means off.
 * - `rope`: optional (NULL for none); borrowed for the call only. Required when the keys
 *   are stored before RoPE (#KVSIEVE_KEYS_PRE_ROPE), ignored otherwise. Then the queries are
 *   given before RoPE too, and kvsieve rotates both: each key by its slot's stored position,
 *   each query by its token's position (in decode the query is the sequence's last token,
 *   in prefill query i of n is token `seq_len - n + i`), numbered by `position_mode`.
 * - `chunk_size`: tokens per work chunk when long sequences are split across threads;
 *   0 picks one.
 * - `position_mode`: a ::kvsieve_position_mode_t value; anything but
 *   #KVSIEVE_POSITIONS_ORIGINAL needs pre-RoPE keys and `rope`.
 * - `max_distance`: the cap of #KVSIEVE_POSITIONS_CAPPED; ignored by the other modes.
 */
typedef struct kvsieve_attention_params {
    float scale;
    float logit_soft_cap;
    const kvsieve_rope_config_t *rope;
    size_t chunk_size;
    uint32_t position_mode;
    uint32_t max_distance;
} kvsieve_attention_params_t;

/**
 * \brief Apply RoPE in place to `x`, token i at position `positions[i]`.
 *
 * \param x Tensor `[n, heads, head_dim]`, float32/float16/bfloat16, read and written in place.
 * \param positions `num_positions` int32 positions; `num_positions` must equal n.
 * \param num_positions Length of `positions`.
 * \param rope RoPE parameters (required); validated against head_dim.
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

/* ------------------------------------------------------------------------------------ */
/* Cache                                                                                 */
/* ------------------------------------------------------------------------------------ */

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
 * \brief Shape and storage of a cache. Start from kvsieve_cache_config_default().
 *
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
 * \brief Memory statistics of a cache (see kvsieve_cache_stats()).
 *
 * `bytes_per_page` counts K and V of one page over all layers; `bytes_used` those of the
 * used pages; `bytes_reserved` everything allocated (K, V, positions, key bounds);
 * `num_tokens` counts shared tokens once per sequence that holds them.
 */
typedef struct kvsieve_cache_stats {
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
 * file comment: readers run concurrently, writers exclusively, free alone.
 */
typedef struct kvsieve_cache kvsieve_cache_t;

/**
 * \brief A configuration with the given shape, float16 storage, NHD layout, post-RoPE keys
 * and key bounds on. Nothing is validated here; kvsieve_cache_new() validates.
 *
 * Ownership: returns a struct by value; nothing to free.
 *
 * Thread safety: thread-safe.
 */
kvsieve_cache_config_t kvsieve_cache_config_default(size_t num_layers, size_t num_kv_heads, size_t head_dim,
                                                    size_t page_size, size_t capacity_pages);

/**
 * \brief Create a cache and allocate its whole page pool.
 *
 * \param config The configuration (required); copied, not retained.
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
 * \param out Receives the configuration (required); untouched on failure.
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
 * \param out Receives the statistics (required); untouched on failure.
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

/* ------------------------------------------------------------------------------------ */
/* Views over engine-owned paged memory                                                  */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief One layer of paged K/V memory owned by the engine, with a batch's CSR page table.
 * Nothing is copied: kvsieve reads the memory during the call that receives the descriptor.
 *
 * Element (page, slot, head, channel) of K is at element offset
 * `page * k_strides[0] + slot * k_strides[1] + head * k_strides[2] + channel` from `k`
 * (likewise V with `v_strides`); strides are in elements, non-negative, the channel stride is
 * 1. A packed NHD layout has strides `{page_size * num_kv_heads * head_dim,
 * num_kv_heads * head_dim, head_dim}`; HND `{page_size * num_kv_heads * head_dim, head_dim,
 * page_size * head_dim}`.
 *
 * - `k`, `v`: aligned to the element size and valid for every element of pages
 *   `0 .. num_pages` (NULL only if `num_pages` is 0).
 * - `device`: #KVSIEVE_DEVICE_CPU. `dtype`: float32, float16 or bfloat16.
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

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_H */
