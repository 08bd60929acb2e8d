"""kvsieve: paged KV cache and CPU attention for LLM inference engines.

Two ways to use it:

* :class:`KvCache` owns the pages: create sequences, append token slots, write each
  layer's K and V, then run :meth:`KvCache.decode` / :meth:`KvCache.prefill`.
* :func:`paged_decode` / :func:`paged_prefill` read K/V pages that the engine owns
  (numpy arrays, NHD or HND, any strides) through a CSR page table, without copying.

Sparse attention reads only the tokens a :class:`Selection` names per KV head. Selections
come from :func:`streaming`, :func:`lambda_mask`, :func:`page_bounds`, or a
:class:`Policy` (a text form such as ``"sinks=4,window=1024;layers=0-1:dense"``), and feed
:meth:`KvCache.decode_sparse` / :meth:`KvCache.prefill_sparse` (or
:func:`paged_decode_sparse` / :func:`paged_prefill_sparse`); :meth:`KvCache.decode_with_policy`
does both steps, and :meth:`KvCache.evict_for_policy` frees what a policy never reads again.

One-shot prompt filtering picks the tokens worth keeping from an early layer:
:func:`gemfilter_select` (GemFilter: the last query's pooled logits, from
:func:`gemfilter_scores` and :func:`avg_pool`), :func:`snapkv` (SnapKV: the attention of an
observation window, per KV head) and :func:`calibrate_filter_layer` (which layer finds a
known needle).

Centroid retrieval (Squeezed Attention) clusters a fixed context's keys once per (sequence,
layer) with :meth:`ClusterIndex.build` (K-means per KV head, optionally with a coarse level);
each decode query then keeps the clusters whose estimated attention passes a threshold
(:meth:`ClusterIndex.calibrate` picks one for a target fraction) or fills a token budget
(:meth:`ClusterIndex.retrieve`), as a :class:`Selection` to union with a local window. In a
policy, ``clusters=N`` does this per head: a :class:`ClusterIndexSet` holds the index of
every (sequence, layer) and goes to :meth:`KvCache.decode_with_policy` as ``clusters=``.

On an NVIDIA GPU (a wheel built with the ``cuda`` feature), :func:`cuda_paged_decode`,
:func:`cuda_paged_append`, :func:`cuda_merge_states`, :func:`cuda_paged_prefill`,
:func:`cuda_update_key_bounds`, :func:`cuda_page_bounds`, :func:`cuda_gemfilter_select` and
:class:`CudaClusterIndex` (K-means on the device, centroid retrieval) work on device arrays
(and :class:`CudaKvCache` keeps kvsieve-owned pages on the device)
given through ``__dlpack__`` (torch, cupy, jax), in place, on the caller's stream.

Every error is a :class:`KvsieveError` (one subclass per kind) carrying a stable
:class:`ErrorCode`; kinds with a built-in counterpart derive from it too (a
:class:`ShapeError` is a ``ValueError``, an :class:`UnknownSequenceError` a ``KeyError``, ...).
float64 arrays are accepted wherever float32 ones are, as a float32 copy. ``help()`` on any
class or function shows its full documentation.
"""

from kvsieve._kvsieve import (
    MAX_HEAD_DIM,
    MAX_PAGE_SIZE,
    CacheConfig,
    ClusterIndex,
    ClusterIndexSet,
    ClusterThresholds,
    CudaClusterIndex,
    CudaKvCache,
    CudaUnavailableError,
    DTypeError,
    ErrorCode,
    InternalError,
    OutOfMemoryError,
    InvalidArgumentError,
    IoError,
    KvCache,
    KvsieveError,
    NullPointerError,
    OutOfPagesError,
    OutOfRangeError,
    ParseError,
    Policy,
    RopeConfig,
    Selection,
    ShapeError,
    UnknownSequenceError,
    UnsupportedError,
    __version__,
    apply_rope,
    avg_pool,
    calibrate_filter_layer,
    cuda_device_count,
    cuda_gemfilter_select,
    cuda_merge_states,
    cuda_page_bounds,
    cuda_paged_append,
    cuda_paged_decode,
    cuda_paged_prefill,
    cuda_update_key_bounds,
    gemfilter_scores,
    gemfilter_select,
    isa,
    kmeans,
    kmeans_seeds,
    lambda_mask,
    merge_states,
    page_bounds,
    paged_decode,
    paged_decode_sparse,
    paged_prefill,
    paged_prefill_sparse,
    snapkv,
    streaming,
    top_k,
    expand_spans,
    window_pages_to_evict,
)

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_PAGE_SIZE",
    "CacheConfig",
    "ClusterIndex",
    "ClusterIndexSet",
    "ClusterThresholds",
    "CudaClusterIndex",
    "CudaKvCache",
    "CudaUnavailableError",
    "DTypeError",
    "ErrorCode",
    "InternalError",
    "OutOfMemoryError",
    "InvalidArgumentError",
    "IoError",
    "KvCache",
    "KvsieveError",
    "NullPointerError",
    "OutOfPagesError",
    "OutOfRangeError",
    "ParseError",
    "Policy",
    "RopeConfig",
    "Selection",
    "ShapeError",
    "UnknownSequenceError",
    "UnsupportedError",
    "__version__",
    "apply_rope",
    "avg_pool",
    "calibrate_filter_layer",
    "cuda_device_count",
    "cuda_gemfilter_select",
    "cuda_merge_states",
    "cuda_page_bounds",
    "cuda_paged_append",
    "cuda_paged_decode",
    "cuda_paged_prefill",
    "cuda_update_key_bounds",
    "gemfilter_scores",
    "gemfilter_select",
    "isa",
    "kmeans",
    "kmeans_seeds",
    "lambda_mask",
    "merge_states",
    "page_bounds",
    "paged_decode",
    "paged_decode_sparse",
    "paged_prefill",
    "paged_prefill_sparse",
    "snapkv",
    "streaming",
    "top_k",
    "expand_spans",
    "window_pages_to_evict",
]
