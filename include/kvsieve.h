/**
 * \file kvsieve.h
 *
 * \brief C API of kvsieve: a paged KV cache and CPU attention for LLM inference engines.
 *
 * This header includes the whole API, which is declared one concept per header under
 * `kvsieve/`. A program may include this header, or only the headers it uses: each one
 * compiles on its own and includes the others it needs.
 *
 * - kvsieve/version.h: version macros, kvsieve_version() and the SIMD instruction set.
 * - kvsieve/error.h: error codes and the error object.
 * - kvsieve/tensor.h: DLPack-layout tensor descriptors, devices and element types.
 * - kvsieve/cache.h: the paged KV cache, its sequences, compaction, queries and key sources.
 * - kvsieve/selection.h: per-head token selections, including page bounds (Quest).
 * - kvsieve/attention.h: attention parameters, RoPE, merging, dense and sparse decode and
 *   prefill on the cache.
 * - kvsieve/policy.h: selection policies and attention and eviction under them.
 * - kvsieve/gemfilter.h: prompt filtering (GemFilter, SnapKV).
 * - kvsieve/cluster.h: K-means cluster indexes, centroid retrieval and cluster sets.
 * - kvsieve/view.h: attention over paged memory the engine owns.
 * - kvsieve/cuda.h: the CUDA entry points.
 *
 * Conventions used by every function these headers declare:
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
 * - **Versioned structs.** Every other struct a program fills for kvsieve or receives from
 *   it (configurations, attention and RoPE parameters, paged-memory descriptors, key
 *   sources, windows, statistics) begins with `size_t struct_size`: the size of the struct
 *   as the program was compiled. Initialise each with its `kvsieve_X_init()` or
 *   `kvsieve_X_default()`, `static inline` functions of these headers that zero the struct,
 *   set `struct_size` to the program's `sizeof` and fill the defaults; then set fields. A
 *   struct made otherwise (`= {0}`, `memset`) has `struct_size` 0 and is refused. Structs
 *   kvsieve fills (statistics, kvsieve_cache_get_config(), ...) are initialised the same way
 *   before the call. kvsieve reads, and writes, only the first `struct_size` bytes of the
 *   caller's struct, so a program built against older headers keeps working with a newer
 *   library: fields added after its `struct_size` take their defaults. A `struct_size`
 *   the library does not know (0, another size, or the larger size of a newer header) gives
 *   #KVSIEVE_ERROR_INVALID_ARGUMENT naming the field after the parameter, e.g.
 *   `config.struct_size` (`rope.struct_size` for the RoPE parameters inside attention
 *   parameters), and changes nothing. In an array of such structs every entry has the same
 *   `struct_size`, which is the array's stride; errors name the entry (`windows[1].struct_size`).
 *   ::kvsieve_tensor_t with ::kvsieve_device_t and ::kvsieve_dtype_t (DLPack's layouts) and
 *   ::kvsieve_key_bounds_entry_t (read from device memory) are not versioned; their layout is
 *   fixed. Which library versions run which programs: see kvsieve/version.h.
 */

#ifndef KVSIEVE_H
#define KVSIEVE_H

#include "kvsieve/version.h"
#include "kvsieve/error.h"
#include "kvsieve/tensor.h"
#include "kvsieve/cache.h"
#include "kvsieve/selection.h"
#include "kvsieve/attention.h"
#include "kvsieve/policy.h"
#include "kvsieve/gemfilter.h"
#include "kvsieve/cluster.h"
#include "kvsieve/view.h"
#include "kvsieve/cuda.h"

#endif /* KVSIEVE_H */
