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
