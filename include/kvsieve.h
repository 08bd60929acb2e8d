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
 *   table export, selection, decode and prefill) take a shared lock and run concurrently;
 *   calls that change it (including eviction for a policy and compaction) take an exclusive
 *   lock and wait for the readers. kvsieve_cache_free() is the exception: no other call on
 *   that cache may be running or start afterwards. A ::kvsieve_selection_t or
 *   ::kvsieve_policy_t never changes once made, so it may be read from any number of threads
 *   at once, and shared between caches; only its `_free` must run alone. A
 *   ::kvsieve_cluster_index_t has its own reader-writer lock: reading calls share it, the
 *   calls that update the index hold it alone; its `_free` must run alone.
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
 * ("avx512f+avx2+fma+f16c", "avx2+fma+f16c" or "portable"; the environment variable
 * KVSIEVE_ISA=avx2 or portable, read once per process, lowers it).
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
 * \brief Where a parse error was found: the byte offset into the parsed text (for
 * kvsieve_policy_parse(), into `text`) of the token at fault, or the text's length when it
 * ended too early.
 *
 * \param error An error, or NULL.
 * \return The offset for an error with code #KVSIEVE_ERROR_PARSE; -1 for NULL and for every
 *         other error.
 *
 * Ownership: `error` stays owned by the caller.
 *
 * Thread safety: thread-safe.
 */
int64_t kvsieve_error_parse_offset(const kvsieve_error_t *error);

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
    /** Host memory (`kDLCPU`), what every function but the `kvsieve_cuda_*` ones takes. */
    KVSIEVE_DEVICE_CPU = 1,
    /** CUDA device memory (`kDLCUDA`): taken by the `kvsieve_cuda_*` functions only; the host
     *  functions refuse it with #KVSIEVE_ERROR_UNSUPPORTED. */
    KVSIEVE_DEVICE_CUDA = 2,
    /** CUDA managed memory (`kDLCUDAManaged`): accepted wherever #KVSIEVE_DEVICE_CUDA is. */
    KVSIEVE_DEVICE_CUDA_MANAGED = 13
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
 * - `device`: #KVSIEVE_DEVICE_CPU, except for the `kvsieve_cuda_*` functions, which take
 *   #KVSIEVE_DEVICE_CUDA (or #KVSIEVE_DEVICE_CUDA_MANAGED) with `device_id` the device ordinal.
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
/* Selections                                                                            */
/* ------------------------------------------------------------------------------------ */

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
 *
 * - `seq_len`, `num_kv_heads`: the selection's shape.
 * - `total`: selected tokens summed over heads.
 * - `density`: `total / (num_kv_heads * seq_len)`; 0 when `seq_len` is 0.
 * - `min_density`, `max_density`: smallest and largest per-head fraction of `seq_len`;
 *   0 when `seq_len` is 0.
 */
typedef struct kvsieve_selection_stats {
    size_t seq_len;
    size_t num_kv_heads;
    size_t total;
    double density;
    double min_density;
    double max_density;
} kvsieve_selection_stats_t;

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
 * \param seq_len Tokens in the sequence; `num_kv_heads * seq_len` at most UINT32_MAX.
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
 * \param out Receives the statistics (required); untouched on failure.
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
 * \brief Settings of page-bound selection (Quest).
 *
 * - `budget_tokens`: tokens to keep per KV head, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `budget_tokens` otherwise). Pages are taken best first until the kept tokens
 *   reach the budget, so a head keeps less than one page more than the budget; a sequence no
 *   longer than the budget is kept whole.
 * - `min_pages`: pages kept per KV head whatever the budget (capped at the page count).
 */
typedef struct kvsieve_page_bounds_config {
    size_t budget_tokens;
    size_t min_pages;
} kvsieve_page_bounds_config_t;

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

/* ------------------------------------------------------------------------------------ */
/* Policies                                                                              */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief A selection policy for every (layer, KV head) of a model, parsed from its text
 * form. Opaque.
 *
 * Text form (whitespace allowed between tokens):
 * `spec ; layers=a-b,c:spec ; heads=layer.head,...:spec`, where a spec is `dense`, or a
 * comma-separated list of `sinks=N`, `window=N`, `pages=N` (page bounds to N tokens per KV
 * head), `min_pages=N`, `clusters=N` with `clusters_k=K` / `cluster_size=S`, `hier=C` and
 * `rank=estimate|mixed` (centroid retrieval; see ::kvsieve_cluster_set_t), `global=N` /
 * `local=N` (Λ-mask: sinks / window with capped positions),
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
 * the order `dense, sinks, window, pages, min_pages, positions, max_distance` (`global=` and
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
 * window and page-bound parts.
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

/* ------------------------------------------------------------------------------------ */
/* Sparse attention on the cache                                                         */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief Row mask of one KV head in sparse prefill (StreamingLLM's window, LM-Infinite's
 * Λ-mask): query token i sees token t only if `t < sinks` or `i - t < window`.
 *
 * An entry with `window` 0 means **no window** for that KV head (its queries see every
 * selected token up to themselves); its `sinks` must then be 0 too, so a zero-initialised
 * entry is "no window". A window of 0 tokens cannot be asked for: it would hide even the
 * query's own token.
 */
typedef struct kvsieve_streaming_window {
    size_t sinks;
    size_t window;
} kvsieve_streaming_window_t;

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
 * tokens per decode query) attends every earlier token. The policy's position mode for the
 * layer replaces `params->position_mode` and `params->max_distance`.
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

/* ------------------------------------------------------------------------------------ */
/* Prompt filtering: GemFilter and SnapKV                                                */
/* ------------------------------------------------------------------------------------ */

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
 * Messages name a field after the parameter that holds the struct, e.g. `keys.tensor`,
 * `keys.layer` (or `keys[2].layer` for an array).
 *
 * Token t is the sequence's t-th token in cache order (as in ::kvsieve_selection_t), or row
 * t of the tensor; n is the sequence's length or the tensor's first dimension.
 *
 * Ownership: the caller owns the struct, the tensor and the cache; kvsieve reads them during
 * the call only.
 */
typedef struct kvsieve_key_source {
    const kvsieve_tensor_t *tensor;
    const kvsieve_cache_t *cache;
    uint64_t seq;
    size_t layer;
} kvsieve_key_source_t;

/**
 * \brief Options of GemFilter's selection. Start from kvsieve_gemfilter_config_default().
 *
 * - `k`: tokens to keep in all, forced ones included; 1..n (#KVSIEVE_ERROR_OUT_OF_RANGE
 *   naming `k` otherwise) and at least `keep_first + keep_last`
 *   (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `k`).
 * - `pool_kernel`: width of the centred average pool over the scores, odd; 1 turns pooling
 *   off (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `pool_kernel` for 0 or an even width).
 * - `keep_first`: the first `keep_first` tokens are always kept (attention sinks).
 * - `keep_last`: the last `keep_last` tokens are always kept (the question).
 */
typedef struct kvsieve_gemfilter_config {
    size_t k;
    size_t pool_kernel;
    size_t keep_first;
    size_t keep_last;
} kvsieve_gemfilter_config_t;

/**
 * \brief Options of SnapKV.
 *
 * - `k`: tokens kept per KV head, the observation window's `w` included; `w..n`
 *   (#KVSIEVE_ERROR_OUT_OF_RANGE naming `k` otherwise).
 * - `pool_kernel`: width of the centred average pool over the votes, odd (SnapKV uses 7);
 *   1 turns pooling off (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `pool_kernel` otherwise).
 * - `scale`: multiplier of q·k before the softmax, finite (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `scale` otherwise); 0 means 1/sqrt(head_dim).
 */
typedef struct kvsieve_snapkv_config {
    size_t k;
    size_t pool_kernel;
    float scale;
} kvsieve_snapkv_config_t;

/**
 * \brief A GemFilter configuration keeping `k` tokens: `pool_kernel` 5, no forced tokens.
 * Nothing is validated here; the calls taking the configuration validate it.
 *
 * Ownership: returns a struct by value; nothing to free.
 *
 * Thread safety: thread-safe.
 */
kvsieve_gemfilter_config_t kvsieve_gemfilter_config_default(size_t k);

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
 * \param keys `num_layers` key sources (NULL only if `num_layers` is 0); sources may mix
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

/* ------------------------------------------------------------------------------------ */
/* K-means clusters of keys and centroid retrieval (Squeezed Attention)                  */
/* ------------------------------------------------------------------------------------ */

/**
 * \brief The K-means clusters of the keys of one (sequence, layer), every KV head, for
 * centroid retrieval.
 *
 * Per KV head, the keys of tokens `0 .. clustered_len` are clustered in normalised space
 * (cosine) by k-means++ and Lloyd iterations; each cluster keeps the mean of its members'
 * raw keys (its centroid), its size and its member list. Optionally a coarse K-means over
 * the fine centroids lets a lookup score only the children of promising coarse clusters.
 * Tokens from `clustered_len` on (the excluded window, or tokens that arrived after the last
 * update) are in no cluster and never retrieved: union a streaming selection
 * (kvsieve_selection_streaming()) to read them.
 *
 * Made by kvsieve_cluster_index_build(), kvsieve_cluster_index_load() or
 * kvsieve_cluster_index_load_for(); released with kvsieve_cluster_index_free().
 *
 * Thread safety: the handle holds a reader-writer lock. Inspection, retrieval, estimates,
 * calibration and saving take the shared lock and run concurrently;
 * kvsieve_cluster_index_assign_new() and kvsieve_cluster_index_rebuild() take the exclusive
 * lock. kvsieve_cluster_index_free() must run alone.
 */
typedef struct kvsieve_cluster_index kvsieve_cluster_index_t;

/**
 * \brief Options of kvsieve_cluster_index_build(). Start from
 * kvsieve_cluster_config_default().
 *
 * - `num_clusters`: fine clusters per KV head, 1 ..= the tokens clustered; or 0 to give
 *   `cluster_fraction` instead. Errors (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `num_clusters`): 0 with `cluster_fraction` 0, more clusters than tokens clustered.
 * - `cluster_fraction`: with `num_clusters` 0, `round(f * tokens clustered)` clusters,
 *   `0 < f <= 1`, at least 1 cluster (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `cluster_fraction` otherwise, or when both it and `num_clusters` are set).
 * - `exclude_window`: the last `exclude_window` tokens are left out (the observation window
 *   a local window selection reads anyway); fewer than the context's tokens
 *   (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `exclude_window`). The same trailing window stays
 *   out after kvsieve_cluster_index_assign_new().
 * - `max_iter`: Lloyd iterations at most (fine and coarse); default 20.
 * - `seed`: k-means++ seed; every head uses it (the coarse level a fixed variation of it).
 * - `num_coarse_clusters`, `coarse_fraction`: the coarse level, a count (1 ..= the fine
 *   clusters) or a fraction of the fine clusters, as for the fine level (errors name these
 *   fields); both 0: no coarse level.
 */
typedef struct kvsieve_cluster_config {
    size_t num_clusters;
    double cluster_fraction;
    size_t exclude_window;
    size_t max_iter;
    uint64_t seed;
    size_t num_coarse_clusters;
    double coarse_fraction;
} kvsieve_cluster_config_t;

/** \brief Which fine clusters kvsieve_cluster_index_retrieve() keeps. */
typedef enum kvsieve_retrieve_mode {
    /** Clusters whose estimate `s_c` exceeds `threshold` (negative keeps every cluster). */
    KVSIEVE_RETRIEVE_THRESHOLD = 0,
    /** As #KVSIEVE_RETRIEVE_THRESHOLD with `thresholds[h]` for KV head h (as
     *  kvsieve_cluster_index_calibrate() returns them). */
    KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD = 1,
    /** Exactly `min(budget, clustered_len)` tokens per head: clusters in rank order (higher
     *  `s_c` first, lower cluster index on ties), whole, the first that does not fit in full
     *  giving its lowest token indices. */
    KVSIEVE_RETRIEVE_BUDGET = 2,
    /** As #KVSIEVE_RETRIEVE_BUDGET, with clusters taken alternately from the estimate ranking
     *  and from the ranking by `b_c = max_j (q_j · C_c + |q_j| r_c) / sqrt(d)`, an upper bound
     *  of the best member's logit (r_c: the cluster's radius, the largest distance of a
     *  member's raw key to C_c), each cluster once, ties to the lower index. It finds a key
     *  that matches the query far better than its cluster-mates, which the mean hides. Needs
     *  an index with radii: any build (host or kvsieve_cuda_cluster_index_build()), or one
     *  loaded from a version 2 file (#KVSIEVE_ERROR_INVALID_ARGUMENT for a version 1 file's).
     *  kvsieve_cuda_cluster_index_retrieve() runs it on the GPU. */
    KVSIEVE_RETRIEVE_BUDGET_MIXED = 3
} kvsieve_retrieve_mode_t;

/** \brief Which coarse clusters a hierarchical retrieval opens. */
typedef enum kvsieve_coarse_mode {
    /** Coarse clusters whose estimate exceeds `coarse_threshold` (negative opens all, and
     *  then the result equals the flat retrieval's). */
    KVSIEVE_COARSE_THRESHOLD = 0,
    /** The best coarse clusters (rank order as for #KVSIEVE_RETRIEVE_BUDGET) until the
     *  tokens beneath them reach `coarse_budget` (the last may overshoot). */
    KVSIEVE_COARSE_BUDGET = 1,
    /** A coarse budget of `ceil(coarse_budget_multiple * budget)`; needs
     *  #KVSIEVE_RETRIEVE_BUDGET or #KVSIEVE_RETRIEVE_BUDGET_MIXED. */
    KVSIEVE_COARSE_BUDGET_MULTIPLE = 2
} kvsieve_coarse_mode_t;

/**
 * \brief Options of kvsieve_cluster_index_retrieve(). Start from
 * kvsieve_retrieve_config_default().
 *
 * For KV head h and each query head j of its group (the `num_qo_heads / num_kv_heads` query
 * heads reading h), the estimated attention one key of cluster c receives is
 * `s_jc = exp(q_j · C_c / sqrt(d)) / sum_i N_i exp(q_j · C_i / sqrt(d))` (C the raw-mean
 * centroids, N the sizes); `s_c` is its mean over the group. `N_c * s_c` is the share of
 * attention cluster c is expected to take, so they sum to 1 over the clusters.
 *
 * - `mode`: a ::kvsieve_retrieve_mode_t value (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `mode`
 *   otherwise).
 * - `threshold`: for #KVSIEVE_RETRIEVE_THRESHOLD; not NaN (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *   naming `threshold`).
 * - `thresholds`, `num_thresholds`: for #KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD, one per KV head
 *   (#KVSIEVE_ERROR_NULL_POINTER, or #KVSIEVE_ERROR_SHAPE for another count, or
 *   #KVSIEVE_ERROR_INVALID_ARGUMENT for a NaN, naming `thresholds`); read during the call only.
 * - `budget`: for the budget modes, at least 1 (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `budget`).
 * - `seq_len`: the length of the sequence the selection is for, at least the index's
 *   kvsieve_cluster_index_seq_len() (#KVSIEVE_ERROR_OUT_OF_RANGE naming `seq_len`); 0 means
 *   that length.
 * - `hierarchical`: score the coarse centroids first and only the children of the coarse
 *   clusters `coarse_mode` opens. The denominator then uses the fine terms of the children
 *   scored plus the coarse terms of the coarse clusters left closed. Needs an index with a
 *   coarse level (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `hierarchical`).
 * - `coarse_mode`: a ::kvsieve_coarse_mode_t value (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `coarse_mode`, also for #KVSIEVE_COARSE_BUDGET_MULTIPLE without a fine budget); read
 *   only with `hierarchical`, as are the three fields below.
 * - `coarse_threshold`: not NaN (errors name `coarse_threshold`).
 * - `coarse_budget`: at least 1 (errors name `coarse_budget`).
 * - `coarse_budget_multiple`: positive and finite (errors name `coarse_budget_multiple`).
 */
typedef struct kvsieve_retrieve_config {
    uint32_t mode;
    double threshold;
    const double *thresholds;
    size_t num_thresholds;
    size_t budget;
    size_t seq_len;
    bool hierarchical;
    uint32_t coarse_mode;
    double coarse_threshold;
    size_t coarse_budget;
    double coarse_budget_multiple;
} kvsieve_retrieve_config_t;

/**
 * \brief What a retrieval cost and kept, summed over KV heads.
 *
 * - `centroid_evals`: query-centroid dot products computed (each query head of a group
 *   against each centroid it scored): `coarse_evals + fine_evals`.
 * - `coarse_evals`: of which against coarse centroids (0 for a flat retrieval).
 * - `fine_evals`: of which against fine centroids.
 * - `clusters_scored`: fine clusters scored.
 * - `clusters_kept`: fine clusters kept (a partly kept cluster counts).
 * - `coarse_kept`: coarse clusters opened (0 for a flat retrieval).
 * - `tokens_kept`: tokens kept (the selection's length).
 */
typedef struct kvsieve_retrieve_stats {
    size_t centroid_evals;
    size_t coarse_evals;
    size_t fine_evals;
    size_t clusters_scored;
    size_t clusters_kept;
    size_t coarse_kept;
    size_t tokens_kept;
} kvsieve_retrieve_stats_t;

/**
 * \brief A build configuration with `num_clusters` fine clusters per KV head:
 * `cluster_fraction` 0, `exclude_window` 0, `max_iter` 20, `seed` 0, no coarse level.
 * Nothing is validated here; kvsieve_cluster_index_build() validates it.
 *
 * Ownership: returns a struct by value; nothing to free.
 *
 * Thread safety: thread-safe.
 */
kvsieve_cluster_config_t kvsieve_cluster_config_default(size_t num_clusters);

/**
 * \brief A retrieval configuration keeping `budget` tokens per KV head
 * (#KVSIEVE_RETRIEVE_BUDGET), flat, for the index's sequence length (`seq_len` 0);
 * `threshold` 0, no `thresholds`; coarse settings (used only once `hierarchical` is set)
 * #KVSIEVE_COARSE_THRESHOLD with `coarse_threshold` -1, which opens every coarse cluster.
 * Nothing is validated here.
 *
 * Ownership: returns a struct by value; nothing to free.
 *
 * Thread safety: thread-safe.
 */
kvsieve_retrieve_config_t kvsieve_retrieve_config_default(size_t budget);

/**
 * \brief Cluster every KV head of the keys in `keys` into a new index.
 *
 * \param keys The key source (required); see ::kvsieve_key_source_t. A tensor source gives
 *        an index of n tokens; a cache source the sequence's current tokens. Errors naming
 *        `keys`: an empty context (#KVSIEVE_ERROR_INVALID_ARGUMENT), a NaN or infinite key
 *        (#KVSIEVE_ERROR_INVALID_ARGUMENT; the message names the token and head), a cache
 *        storing keys before RoPE.
 * \param config The options (required); copied. See ::kvsieve_cluster_config_t for the
 *        errors it can give.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()); the index
 * copies what it needs and keeps no reference to the keys.
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_build(const kvsieve_key_source_t *keys, const kvsieve_cluster_config_t *config,
                                             kvsieve_cluster_index_t **out);

/**
 * \brief Free an index. NULL is ignored.
 *
 * Ownership: releases `index`. Thread safety: no other call on this index may be running
 * or start afterwards.
 */
void kvsieve_cluster_index_free(kvsieve_cluster_index_t *index);

/**
 * \brief The configuration the index was built with (for a loaded index, the one saved).
 *
 * \param index The index (required).
 * \param out Receives the configuration (required); untouched on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_get_config(const kvsieve_cluster_index_t *index, kvsieve_cluster_config_t *out);

/**
 * \brief Number of KV heads of the index.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_kv_heads(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Channels per key (`head_dim`) of the index.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_head_dim(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Fine clusters per KV head.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_clusters(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Coarse clusters per KV head (0 without a coarse level).
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_num_coarse_clusters(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief The sequence's length when the index was built.
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_seq_len_at_build(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief The sequence's length when the index was built or last updated by
 * kvsieve_cluster_index_assign_new().
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_seq_len(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Tokens `0 .. clustered_len` are in clusters (every KV head the same).
 *
 * \param index The index (required). \param out Receives the value (required); untouched on
 * failure. Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_clustered_len(const kvsieve_cluster_index_t *index, size_t *out);

/**
 * \brief Per-head arrays of an index, copied into a caller buffer. This function and the
 * ones declared after it take:
 *
 * - `index`: the index (required);
 * - `head`: the KV head, below num_kv_heads (#KVSIEVE_ERROR_OUT_OF_RANGE naming `head`);
 * - the buffer: `capacity` values (NULL only if `capacity` is 0; errors name it after the
 *   parameter, e.g. `sizes`);
 * - `capacity`: its length; fewer than the array's length gives
 *   #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written);
 * - `out_len`: optional, receives the number of values written; untouched on failure.
 *
 * The arrays:
 * - kvsieve_cluster_index_sizes(): `num_clusters` cluster sizes (members per cluster).
 * - kvsieve_cluster_index_centroids(): `num_clusters * head_dim` floats, cluster-major: the
 *   mean of each cluster's raw keys as of the last build (after
 *   kvsieve_cluster_index_assign_new() they no longer move). Retrieval scores these.
 * - kvsieve_cluster_index_centroids_normalized(): likewise, the unit-norm centroids keys are
 *   assigned by (each key belongs to the cluster whose unit centroid has the largest cosine
 *   with it).
 * - kvsieve_cluster_index_radii(): `num_clusters` floats, each cluster's radius: the largest
 *   distance of a member's raw key to its raw centroid (grown by
 *   kvsieve_cluster_index_assign_new()), which #KVSIEVE_RETRIEVE_BUDGET_MIXED ranks by; none
 *   (`out_len` 0) for an index without radii (loaded from a version 1 file).
 * - kvsieve_cluster_index_member_offsets(): `num_clusters + 1` CSR offsets into the members.
 * - kvsieve_cluster_index_members(): `clustered_len` token indices, cluster c's members
 *   (ascending) at `members[offsets[c] .. offsets[c + 1]]`.
 * - kvsieve_cluster_index_coarse_sizes(), _coarse_centroids(), _coarse_child_offsets(),
 *   _coarse_children(): the coarse level (`num_coarse_clusters` sizes, i.e. tokens beneath;
 *   centroids that are the size-weighted means of their children's centroids;
 *   `num_coarse_clusters + 1` offsets; `num_clusters` fine cluster ids, ascending per coarse
 *   cluster). An index without a coarse level gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *   `index`.
 *
 * Ownership: the values are copied; nothing is retained. Thread safety: thread-safe (shared
 * lock).
 */
kvsieve_error_t *kvsieve_cluster_index_sizes(const kvsieve_cluster_index_t *index, size_t head, uint32_t *sizes,
                                             size_t capacity, size_t *out_len);
/** \brief Raw-mean centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_centroids(const kvsieve_cluster_index_t *index, size_t head, float *centroids,
                                                 size_t capacity, size_t *out_len);
/** \brief Unit-norm centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_centroids_normalized(const kvsieve_cluster_index_t *index, size_t head,
                                                            float *centroids, size_t capacity, size_t *out_len);
/** \brief Cluster radii of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_radii(const kvsieve_cluster_index_t *index, size_t head, float *radii,
                                             size_t capacity, size_t *out_len);
/** \brief CSR offsets of the member lists of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_member_offsets(const kvsieve_cluster_index_t *index, size_t head, uint32_t *offsets,
                                                      size_t capacity, size_t *out_len);
/** \brief Member lists of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_members(const kvsieve_cluster_index_t *index, size_t head, uint32_t *members,
                                               size_t capacity, size_t *out_len);
/** \brief Coarse cluster sizes of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_sizes(const kvsieve_cluster_index_t *index, size_t head, uint32_t *sizes,
                                                    size_t capacity, size_t *out_len);
/** \brief Coarse centroids of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_centroids(const kvsieve_cluster_index_t *index, size_t head,
                                                        float *centroids, size_t capacity, size_t *out_len);
/** \brief CSR offsets of the coarse clusters' children; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_child_offsets(const kvsieve_cluster_index_t *index, size_t head,
                                                            uint32_t *offsets, size_t capacity, size_t *out_len);
/** \brief Children of the coarse clusters of one KV head; see kvsieve_cluster_index_sizes(). */
kvsieve_error_t *kvsieve_cluster_index_coarse_children(const kvsieve_cluster_index_t *index, size_t head,
                                                       uint32_t *children, size_t capacity, size_t *out_len);

/**
 * \brief The estimates `s_c` of every fine cluster for the decode query `q` (flat scoring;
 * see ::kvsieve_retrieve_config_t for the formula), head-major: entry
 * `h * num_clusters + c`.
 *
 * \param index The index (required).
 * \param q The decode query, after RoPE: `[num_qo_heads, head_dim]` or
 *        `[1, num_qo_heads, head_dim]`, any accepted dtype and strides; head_dim that of the
 *        index and num_qo_heads a positive multiple of its KV heads (#KVSIEVE_ERROR_SHAPE
 *        naming `q`), finite (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `q`).
 * \param estimates Caller buffer of `capacity` doubles (NULL only if `capacity` is 0); must
 *        not overlap `q`.
 * \param capacity Its length; fewer than `num_kv_heads * num_clusters` gives
 *        #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity` (nothing is written).
 * \param out_len Optional: receives the number of values written; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_estimates(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *q,
                                                 double *estimates, size_t capacity, size_t *out_len);

/**
 * \brief Centroid retrieval: the tokens of the clusters the decode query `q` needs, per KV
 * head, as a new selection over `config->seq_len` tokens. Only clustered tokens
 * (`0 .. clustered_len`) are ever selected: union a streaming selection for the rest
 * (kvsieve_selection_union()) before sparse attention.
 *
 * \param index The index (required).
 * \param q The decode query, as in kvsieve_cluster_index_estimates().
 * \param config The options (required); copied. See ::kvsieve_retrieve_config_t for the
 *        errors it can give.
 * \param out Receives the new selection (required); untouched on failure.
 * \param stats Optional: receives the cost and counts; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_selection_free()); the selection
 * is independent of the index.
 *
 * Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_retrieve(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *q,
                                                const kvsieve_retrieve_config_t *config, kvsieve_selection_t **out,
                                                kvsieve_retrieve_stats_t *stats);

/**
 * \brief Thresholds that make #KVSIEVE_RETRIEVE_THRESHOLD keep on average `target_fraction`
 * of the clustered keys on the calibration queries `queries`.
 *
 * Every (query, head, cluster) gives an estimate `s` and a weight
 * `N_c / (clustered_len * m)`; the cut is placed between two distinct values of `s` where
 * the kept weight is closest to the target (fewer kept on a tie), τ the midpoint of the two
 * values (the largest `s` when nothing is kept, -1 when everything is). With `per_head`
 * each KV head gets its own cut; otherwise one cut over all heads, repeated per head.
 *
 * \param index The index (required).
 * \param queries Calibration queries after RoPE, `[m, num_qo_heads, head_dim]`, m >= 1
 *        (#KVSIEVE_ERROR_SHAPE naming `queries`), finite.
 * \param target_fraction In (0, 1] (#KVSIEVE_ERROR_INVALID_ARGUMENT naming
 *        `target_fraction`).
 * \param per_head Calibrate each KV head on its own.
 * \param thresholds Caller buffer of `capacity` doubles (NULL only if `capacity` is 0);
 *        receives τ per KV head, ready for #KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD.
 * \param capacity Length of `thresholds` (and of `kept_fractions`); fewer than num_kv_heads
 *        gives #KVSIEVE_ERROR_INVALID_ARGUMENT naming `capacity`.
 * \param kept_fractions Optional: receives per KV head the mean fraction of clustered keys
 *        its τ keeps on the calibration queries.
 * \return NULL on success, or an error (owned by the caller); nothing is written on failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_calibrate(const kvsieve_cluster_index_t *index, const kvsieve_tensor_t *queries,
                                                 double target_fraction, bool per_head, double *thresholds,
                                                 size_t capacity, double *kept_fractions);

/**
 * \brief Assign the keys that arrived since the index was built or last updated (tokens
 * `clustered_len .. n - exclude_window`) to their nearest unit centroid, updating sizes,
 * member lists and the coarse level's sizes and centroids. Centroids do not move: call
 * kvsieve_cluster_index_rebuild() once many tokens have arrived.
 *
 * \param index The index (required).
 * \param keys The key source (required), the same sequence's keys: the same num_kv_heads and
 *        head_dim (#KVSIEVE_ERROR_SHAPE naming `keys`), at least kvsieve_cluster_index_seq_len()
 *        tokens (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `keys`: it was truncated or
 *        compacted, rebuild), finite.
 * \param out_added Optional: receives the number of tokens assigned per head; must not
 *        overlap the key tensor; untouched on failure.
 * \return NULL on success, or an error (owned by the caller); the index is unchanged on
 *         failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (exclusive lock on the index;
 * a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_assign_new(kvsieve_cluster_index_t *index, const kvsieve_key_source_t *keys,
                                                  size_t *out_added);

/**
 * \brief Cluster again from scratch, with the configuration the index was built with, over
 * the source's current keys. The index is replaced only on success.
 *
 * \param index The index (required).
 * \param keys The key source (required); the same num_kv_heads and head_dim
 *        (#KVSIEVE_ERROR_SHAPE naming `keys`) and at least kvsieve_cluster_index_seq_len()
 *        tokens; otherwise as for kvsieve_cluster_index_build().
 * \return NULL on success, or an error (owned by the caller); the index is unchanged on
 *         failure.
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (exclusive lock on the index;
 * a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_rebuild(kvsieve_cluster_index_t *index, const kvsieve_key_source_t *keys);

/**
 * \brief Write the index to a file: safetensors (little-endian tensors of centroids, sizes,
 * member lists, cluster radii and the coarse level) with versioned, checksummed metadata
 * (format version 2).
 *
 * \param index The index (required).
 * \param path File path (required), NUL-terminated, non-empty (#KVSIEVE_ERROR_INVALID_ARGUMENT
 *        naming `path`); the file is created or replaced. A failure to write gives
 *        #KVSIEVE_ERROR_IO.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: nothing is retained. Thread safety: thread-safe (shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_save(const kvsieve_cluster_index_t *index, const char *path);

/**
 * \brief Read an index written by kvsieve_cluster_index_save(), verifying the container,
 * format and version, every field and tensor shape, the checksum and the index's invariants.
 * Version 1 files (without radii) load too; their index refuses
 * #KVSIEVE_RETRIEVE_BUDGET_MIXED until rebuilt.
 * A missing, truncated, corrupted or foreign file gives #KVSIEVE_ERROR_IO naming the file
 * and what is wrong.
 *
 * \param path File path (required), NUL-terminated.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()).
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cluster_index_load(const char *path, kvsieve_cluster_index_t **out);

/**
 * \brief kvsieve_cluster_index_load(), then check that the index fits the keys of `keys`:
 * the same num_kv_heads and head_dim, and a sequence at least as long as the index covers.
 * A mismatch is #KVSIEVE_ERROR_IO too (the file is for another cache or sequence).
 *
 * \param path File path (required), NUL-terminated.
 * \param keys The key source (required); see ::kvsieve_key_source_t.
 * \param out Receives the new index (required); untouched on failure.
 * \return NULL on success, or an error (owned by the caller).
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_index_free()).
 *
 * Thread safety: thread-safe (a cache source takes the cache's shared lock).
 */
kvsieve_error_t *kvsieve_cluster_index_load_for(const char *path, const kvsieve_key_source_t *keys,
                                                kvsieve_cluster_index_t **out);

/* Centroid retrieval in policies ------------------------------------------------------- */

/**
 * \brief The cluster indexes that a policy with `clusters=` reads: one
 * ::kvsieve_cluster_index_t per (sequence, layer), owned by the engine.
 *
 * Policy text: `clusters=N` keeps, per KV head, the best clusters of the layer's index up to
 * N tokens (by estimated attention), united with the head's sinks and window and with every
 * token the index does not cover yet. Options, only with `clusters=`: `clusters_k=K` fine
 * clusters per head, or `cluster_size=S` one cluster per S tokens clustered (default 16);
 * `hier=C` hierarchical lookup through C coarse clusters per head, opening the best coarse
 * clusters until they hold twice the budget; `rank=estimate` (default) or `rank=mixed`
 * (clusters taken as #KVSIEVE_RETRIEVE_BUDGET or #KVSIEVE_RETRIEVE_BUDGET_MIXED). Example:
 * `sinks=4,window=64,clusters=512,cluster_size=16,hier=16,rank=mixed;layers=0-1:dense`.
 *
 * Lifecycle and staleness rule: after a sequence's prefill, kvsieve_cluster_set_build()
 * clusters the keys of every layer whose policy uses `clusters=`, leaving out the smallest
 * `window=` of that layer's cluster heads. Tokens appended afterwards are in no cluster and
 * are always read (so nothing new is missed); kvsieve_cluster_set_update() assigns those
 * that have left the window to their nearest centroid, so the uncovered tail stays the
 * window. After a truncation or compaction decoding fails naming the index: build again.
 * An index built from a cache of post-RoPE keys clusters them as stored, and decode scores
 * the query after RoPE at its real position. One built from a cache of pre-RoPE keys
 * clusters the raw keys, and decode under `positions=capped,max_distance=M` scores the query
 * rotated to position M: exactly the logit attention gives a token at the capped distance
 * (every token at least M back; LM-Infinite sets the window to M). For other position
 * modes on a pre-RoPE cache, build the set from a twin cache of post-RoPE keys (same
 * sequence ids and tokens).
 *
 * Made by kvsieve_cluster_set_new(), released by kvsieve_cluster_set_free().
 *
 * Thread safety: the handle holds a reader-writer lock. kvsieve_cache_decode_with_clusters()
 * and kvsieve_cluster_set_info() take the shared lock; build, update and remove take the
 * exclusive lock. kvsieve_cluster_set_free() must run alone.
 */
typedef struct kvsieve_cluster_set kvsieve_cluster_set_t;

/**
 * \brief A new, empty cluster index set.
 *
 * \param seed k-means++ seed of the indexes it builds.
 * \param out Receives the set (required); untouched on failure.
 *
 * Ownership: the caller owns `*out` (release with kvsieve_cluster_set_free()).
 * Thread safety: thread-safe.
 */
kvsieve_error_t *kvsieve_cluster_set_new(uint64_t seed, kvsieve_cluster_set_t **out);

/**
 * \brief Release a set and its indexes.
 *
 * \param set A set, or NULL (ignored). Ownership: taken.
 *
 * Thread safety: no other call on `set` may run concurrently or after.
 */
void kvsieve_cluster_set_free(kvsieve_cluster_set_t *set);

/**
 * \brief (Re)build the indexes of sequence `seq` for every layer where `policy` uses
 * `clusters=`, from the keys in `cache`. The sequence's indexes are replaced only when every
 * layer succeeds.
 *
 * \param set The set (required).
 * \param cache The cache holding the keys (required): post-RoPE keys are clustered as stored,
 *        pre-RoPE keys raw (see ::kvsieve_cluster_set_t).
 * \param seq The sequence (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `seq` when it is empty).
 * \param policy The policy (required); validated against the cache's shape.
 * \param out_layers Optional: receives the number of layers indexed (0 for a policy without
 *        `clusters=`).
 * \return NULL on success, or an error (owned by the caller); the set is unchanged on failure.
 *
 * Ownership: nothing is retained; the indexes copy what they need.
 * Thread safety: exclusive lock on `set`, shared lock on `cache`.
 */
kvsieve_error_t *kvsieve_cluster_set_build(kvsieve_cluster_set_t *set, const kvsieve_cache_t *cache, uint64_t seq,
                                           const kvsieve_policy_t *policy, size_t *out_layers);

/**
 * \brief Assign the tokens of `seq` appended since its indexes were built or updated, and
 * that have left the excluded window, to their nearest centroids, in every layer (centroids
 * do not move). All layers or none.
 *
 * \param set The set (required).
 * \param cache The cache the indexes were built from (required).
 * \param seq The sequence; a sequence shorter than its indexes cover (truncated or compacted)
 *        fails with #KVSIEVE_ERROR_INVALID_ARGUMENT naming `keys`.
 * \param out_assigned Optional: tokens assigned per head, summed over layers.
 * \return NULL on success, or an error (owned by the caller); the set is unchanged on failure.
 *
 * Thread safety: exclusive lock on `set`, shared lock on `cache`.
 */
kvsieve_error_t *kvsieve_cluster_set_update(kvsieve_cluster_set_t *set, const kvsieve_cache_t *cache, uint64_t seq,
                                            size_t *out_assigned);

/**
 * \brief Drop every index of `seq` (for a freed sequence).
 *
 * \param set The set (required).
 * \param seq The sequence (unknown sequences hold no index: 0 removed).
 * \param out_removed Optional: receives the number of indexes dropped.
 *
 * Thread safety: exclusive lock on `set`.
 */
kvsieve_error_t *kvsieve_cluster_set_remove_sequence(kvsieve_cluster_set_t *set, uint64_t seq, size_t *out_removed);

/**
 * \brief What a set holds: the number of indexes, and for (`seq`, `layer`) the tokens its
 * index covers (`0 .. clustered_len`) and its fine clusters per head, both 0 without one.
 *
 * \param set The set (required).
 * \param seq A sequence.
 * \param layer A layer.
 * \param out_len Optional: indexes held over all sequences and layers.
 * \param out_clustered_len Optional.
 * \param out_num_clusters Optional.
 *
 * Thread safety: shared lock on `set`.
 */
kvsieve_error_t *kvsieve_cluster_set_info(const kvsieve_cluster_set_t *set, uint64_t seq, size_t layer, size_t *out_len,
                                          size_t *out_clustered_len, size_t *out_num_clusters);

/**
 * \brief Decode under a policy with centroid retrieval: as kvsieve_cache_decode_with_policy(),
 * and heads with `clusters=` also read what their (sequence, layer) index in `set`
 * retrieves for the query, plus the tokens the index does not cover yet. The result equals
 * dense attention over exactly retrieved ∪ sinks ∪ window ∪ uncovered tokens.
 *
 * With a cache storing keys after RoPE, `q` is after RoPE. With one storing them before RoPE
 * (remapped positions: `positions=capped` or `contiguous`), `q` is before RoPE,
 * `params->rope` is required (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `params.rope`), and a
 * copy of `q` is rotated for scoring: to position `max_distance` against an index of this
 * cache's raw keys (capped positions only), or to its original position against an index
 * built from a twin cache of post-RoPE keys. A mismatch (raw keys under other positions,
 * or with a post-RoPE cache) fails naming `clusters`.
 *
 * \param cache The cache (required).
 * \param layer Layer index.
 * \param seq_ids `batch` sequence ids.
 * \param batch Number of sequences.
 * \param q Queries `[batch, num_qo_heads, head_dim]`.
 * \param policy The policy (required); validated against the cache's shape.
 * \param set The index set (required). A sequence with no index at a `clusters=` layer
 *        fails with #KVSIEVE_ERROR_INVALID_ARGUMENT naming `clusters` (call
 *        kvsieve_cluster_set_build()); so does an index covering more tokens than the
 *        sequence holds.
 * \param out Output, same shape as `q`.
 * \param lse Optional: `batch * num_qo_heads` LSEs.
 * \param params Optional (NULL = defaults).
 * \param out_selections Optional: `batch` slots receiving a new selection handle per sequence
 *        (NULL in every slot when the layer is dense).
 * \param out_centroids_scored Optional: `batch` slots receiving the centroid rows scored per
 *        sequence (fine clusters scored plus every coarse centroid under `hier=`, summed over
 *        the KV heads that retrieve; each row is head_dim floats).
 * \param out_radii_read Optional: `batch` slots receiving the cluster radii read per sequence
 *        (`rank=mixed`: one float per fine cluster scored; 0 otherwise).
 * \return NULL on success, or an error (owned by the caller); `out`, `lse` and the optional
 *         outputs untouched on failure.
 *
 * Ownership: the caller owns every handle written to `out_selections`.
 * Thread safety: shared locks on `set` and `cache`.
 */
kvsieve_error_t *kvsieve_cache_decode_with_clusters(const kvsieve_cache_t *cache, size_t layer, const uint64_t *seq_ids,
                                                    size_t batch, const kvsieve_tensor_t *q,
                                                    const kvsieve_policy_t *policy, const kvsieve_cluster_set_t *set,
                                                    const kvsieve_tensor_t *out, float *lse,
                                                    const kvsieve_attention_params_t *params,
                                                    kvsieve_selection_t **out_selections, size_t *out_centroids_scored,
                                                    size_t *out_radii_read);

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

/* ------------------------------------------------------------------------------------ */
/* CUDA backend                                                                          */
/* ------------------------------------------------------------------------------------ */

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
 * \param out_view Receives the descriptor (required).
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

/**
 * \brief One page's key-bound update for kvsieve_cuda_update_key_bounds(): fold the keys in
 * the slots whose bits are set in `slot_mask` (bit s = slot s, page_size at most 64) into
 * the bounds of `page`, starting from the bounds stored there, or from empty (+inf / -inf)
 * when `reset` is non-zero (a page reused for a new sequence). Lives in device memory.
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

#endif /* KVSIEVE_H */
