"""kvsieve: paged KV cache and CPU attention for LLM inference engines.

Two ways to use it:

* :class:`KvCache` owns the pages: create sequences, append token slots, write each
  layer's K and V, then run :meth:`KvCache.decode` / :meth:`KvCache.prefill`.
* :func:`paged_decode` / :func:`paged_prefill` read K/V pages that the engine owns
  (numpy arrays, NHD or HND, any strides) through a CSR page table, without copying.

Every error is a :class:`KvsieveError` (one subclass per kind) carrying a stable
:class:`ErrorCode`.
"""

from kvsieve._kvsieve import (
    MAX_HEAD_DIM,
    MAX_PAGE_SIZE,
    CacheConfig,
    CudaUnavailableError,
    DTypeError,
    ErrorCode,
    InternalError,
    InvalidArgumentError,
    IoError,
    KvCache,
    KvsieveError,
    NullPointerError,
    OutOfPagesError,
    OutOfRangeError,
    ParseError,
    RopeConfig,
    ShapeError,
    UnknownSequenceError,
    UnsupportedError,
    __version__,
    apply_rope,
    isa,
    merge_states,
    paged_decode,
    paged_prefill,
)

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_PAGE_SIZE",
    "CacheConfig",
    "CudaUnavailableError",
    "DTypeError",
    "ErrorCode",
    "InternalError",
    "InvalidArgumentError",
    "IoError",
    "KvCache",
    "KvsieveError",
    "NullPointerError",
    "OutOfPagesError",
    "OutOfRangeError",
    "ParseError",
    "RopeConfig",
    "ShapeError",
    "UnknownSequenceError",
    "UnsupportedError",
    "__version__",
    "apply_rope",
    "isa",
    "merge_states",
    "paged_decode",
    "paged_prefill",
]
