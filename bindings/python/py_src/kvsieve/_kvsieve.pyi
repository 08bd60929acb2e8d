"""Type stubs of the kvsieve extension module (`kvsieve._kvsieve`).

Conventions shared by every call:

* Float arrays are numpy arrays of float32 or float16, with any non-negative strides
  (transposed or sliced views are read in place, without a copy). Arguments other than
  engine-owned pages that have negative strides are copied first.
* Integer arguments (sequence ids, slots, page tables, positions) are sequences of Python
  ints or 1-D integer numpy arrays.
* Queries are ``[tokens, num_qo_heads, head_dim]`` with ``num_qo_heads`` a multiple of
  ``num_kv_heads`` (query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``).
* ``scale`` defaults to ``1 / sqrt(head_dim)``; the LSE is the natural log of the sum of
  ``exp(score)``; a query that sees no key gets a zero output and an LSE of ``-inf``.
* Every error is a :class:`KvsieveError` subclass; a call that raises changed nothing.
* The GIL is released while kvsieve works, so calls from several Python threads run in
  parallel (a :class:`KvCache` serialises writers and lets readers share it).
"""

import enum
from typing import ClassVar, Sequence, Union

import numpy as np
import numpy.typing as npt

FloatArray = Union[npt.NDArray[np.float32], npt.NDArray[np.float16]]
IntArray = Union[Sequence[int], npt.NDArray[np.integer]]

__version__: str
"""The library version, ``MAJOR.MINOR.PATCH``."""

MAX_HEAD_DIM: int
"""Largest supported head_dim (head_dim must be a multiple of 8 from 8 to this)."""

MAX_PAGE_SIZE: int
"""Largest supported page_size."""

class ErrorCode(enum.IntEnum):
    """Stable numeric error codes, shared with the C ABI (kvsieve_error_code)."""

    INVALID_ARGUMENT = 1
    SHAPE = 2
    DTYPE = 3
    NULL_POINTER = 4
    UNKNOWN_SEQUENCE = 5
    OUT_OF_RANGE = 6
    OUT_OF_PAGES = 7
    UNSUPPORTED = 8
    CUDA_UNAVAILABLE = 9
    IO = 10
    PARSE = 11
    INTERNAL = 12

class KvsieveError(Exception):
    """Base class of every error raised by kvsieve.

    kvsieve always raises one of the subclasses below, one per :class:`ErrorCode`; each
    carries, as class attributes, ``code`` (the stable :class:`ErrorCode` of its kind) and
    ``code_name`` (its short lowercase name: ``"shape"``, ``"out_of_pages"``, ...). The
    message names the parameter at fault and what was expected.
    """

    code: ClassVar[ErrorCode]
    code_name: ClassVar[str]

class InvalidArgumentError(KvsieveError):
    """An argument has a value outside what the call accepts."""

class ShapeError(KvsieveError):
    """An array has the wrong shape or strides."""

class DTypeError(KvsieveError):
    """An array has a dtype the call does not accept."""

class NullPointerError(KvsieveError):
    """A required buffer was missing."""

class UnknownSequenceError(KvsieveError):
    """A sequence id the cache does not hold."""

class OutOfRangeError(KvsieveError):
    """An index (token, slot, page, layer, head) is out of range."""

class OutOfPagesError(KvsieveError):
    """The page pool has too few free pages for the request."""

class UnsupportedError(KvsieveError):
    """A configuration kvsieve does not support (for example a head_dim)."""

class CudaUnavailableError(KvsieveError):
    """The CUDA driver or device is not available."""

class IoError(KvsieveError):
    """Reading or writing a file failed, or its contents are malformed."""

class ParseError(KvsieveError):
    """Text (such as a policy) could not be parsed."""

class InternalError(KvsieveError):
    """A bug inside kvsieve (or a failed :meth:`KvCache.check_invariants`). Please report it."""

class RopeConfig:
    """Rotary position embedding parameters, usable as the ``rope=`` argument.

    Pair ``i`` (``0 <= i < rotary_dim / 2``) rotates by
    ``(position / position_scale) * theta ** (-2 i / rotary_dim)`` (frequencies in float32);
    channels past ``rotary_dim`` are left unchanged.

    Args:
        theta: base of the frequencies, finite and > 1 (10000.0 for Llama 2).
        style: ``"half_split"`` (channel ``i`` pairs with ``i + rotary_dim/2``: GPT-NeoX,
            HF Llama) or ``"adjacent_pairs"`` (``2i`` with ``2i+1``: GPT-J, GGUF Llama).
        rotary_dim: rotated channels, even, at most head_dim (checked at use); 0 = all.
        position_scale: positions are divided by this (linear scaling), finite and > 0.

    Raises:
        InvalidArgumentError: theta, style or position_scale out of range.
        OutOfRangeError: a negative rotary_dim.
    """

    def __init__(self, theta: float, style: str = "half_split", rotary_dim: int = 0, position_scale: float = 1.0) -> None: ...
    @property
    def theta(self) -> float:
        """Base of the rotation frequencies."""
    @property
    def style(self) -> str:
        """``"half_split"`` or ``"adjacent_pairs"``."""
    @property
    def rotary_dim(self) -> int:
        """Rotated channels (0 = all of head_dim)."""
    @property
    def position_scale(self) -> float:
        """Positions are divided by this before rotation."""
    def __eq__(self, other: object) -> bool: ...

class CacheConfig:
    """Shape and storage of a :class:`KvCache` (read-only)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def page_size(self) -> int:
        """Token slots per page."""
    @property
    def capacity_pages(self) -> int:
        """Pages in the pool, shared by all sequences; each page spans every layer."""
    @property
    def dtype(self) -> str:
        """Storage dtype: ``"f32"``, ``"f16"`` or ``"bf16"``."""
    @property
    def layout(self) -> str:
        """In-page layout: ``"nhd"`` or ``"hnd"``."""
    @property
    def key_rope(self) -> str:
        """``"post"`` (keys stored after RoPE) or ``"pre"`` (RoPE applied when read)."""
    @property
    def track_key_bounds(self) -> bool:
        """Whether per-page key min/max are kept."""

class KvCache:
    """Paged KV storage owned by kvsieve, for many sequences.

    Pages of ``page_size`` token slots come from one pool of ``capacity_pages`` pages; a
    page holds K and V of every layer and KV head for its slots. To store tokens, call
    :meth:`append` (slots and positions), then :meth:`write` (or :meth:`write_slots`) the
    new tokens' K and V at every layer before attention reads them.

    Thread safety: one cache may be used from any number of Python threads. Reads
    (attention, page tables, statistics, positions, bounds) run concurrently; calls that
    change the cache wait for exclusive access. The GIL is released meanwhile.

    Args:
        num_layers: layers (at least 1).
        num_kv_heads: KV heads (at least 1).
        head_dim: channels per head, a multiple of 8 from 8 to :data:`MAX_HEAD_DIM`.
        page_size: token slots per page, 1 to :data:`MAX_PAGE_SIZE`.
        capacity_pages: pages in the pool (all memory is allocated up front).
        dtype: storage dtype, ``"f32"``, ``"f16"`` or ``"bf16"`` (float32 and float16
            inputs are converted, rounding to nearest even).
        layout: in-page layout, ``"nhd"`` (``[page_size, heads, head_dim]``) or ``"hnd"``.
        key_rope: ``"post"`` if the engine applies RoPE before writing keys, ``"pre"`` if
            keys are stored without it. Then attention needs ``rope=``, takes queries before
            RoPE too, and rotates each key by its slot's stored position and each query by
            the position of its own token.
        track_key_bounds: keep per-page, per-channel key min/max (:meth:`page_key_bounds`).

    Raises:
        InvalidArgumentError: a zero or unknown setting (the message names it).
        UnsupportedError: an unsupported head_dim.
        OutOfRangeError: a negative size.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        capacity_pages: int,
        dtype: str = "f16",
        layout: str = "nhd",
        key_rope: str = "post",
        track_key_bounds: bool = True,
    ) -> None: ...
    @property
    def config(self) -> CacheConfig:
        """The cache's configuration."""
    def create_sequence(self) -> int:
        """Create an empty sequence; returns its id (ids are never reused)."""
    def fork(self, seq: int) -> int:
        """A new sequence sharing all of ``seq``'s pages (prefix sharing).

        Shared pages are copied on the first write to them by either side.

        Raises:
            UnknownSequenceError: ``seq`` is not in the cache.
        """
    def free_sequence(self, seq: int) -> None:
        """Drop a sequence; pages no other sequence shares go back to the pool.

        Raises:
            UnknownSequenceError: ``seq`` is not in the cache.
        """
    def sequences(self) -> list[int]:
        """Ids of all live sequences, ascending."""
    def append(self, seq: int, n: int, positions: IntArray | None = None) -> npt.NDArray[np.int64]:
        """Append ``n`` token slots to a sequence and record their original positions.

        Args:
            seq: the sequence.
            n: tokens to append.
            positions: ``n`` int32 positions; by default one past the last stored
                position (0 for an empty sequence) and counting up.

        Returns:
            The slot mapping, int64 ``[n]``: slot ``page * page_size + offset`` of each new
            token (for :meth:`write_slots`).

        Raises:
            OutOfPagesError: too few free pages (the sequence is left unchanged).
            ShapeError: ``positions`` does not have ``n`` entries.
        """
    def write(self, seq: int, layer: int, start: int, k: FloatArray, v: FloatArray) -> None:
        """Write K and V of one layer for tokens ``start .. start + n`` of a sequence.

        Args:
            k: ``[n, num_kv_heads, head_dim]`` float32 or float16, any strides.
            v: same shape as ``k``, float32 or float16.

        Pages shared with another sequence are copied first; key bounds are updated.

        Raises:
            OutOfRangeError: ``layer`` or ``start + n`` out of range.
            ShapeError, DTypeError: ``k`` or ``v`` malformed (the message names which).
            OutOfPagesError: copying shared pages needs more pages than are free.
        """
    def write_slots(self, seq: int, layer: int, slots: IntArray, k: FloatArray, v: FloatArray) -> None:
        """Write K and V of one layer into slots from a mapping returned by :meth:`append`.

        Every slot must hold a token of ``seq``; ``k`` and ``v`` are ``[len(slots),
        num_kv_heads, head_dim]``.

        Raises:
            OutOfRangeError: a slot that is not one of the sequence's tokens
                (``slots[i]`` named), or ``layer`` out of range.
        """
    def truncate(self, seq: int, new_len: int) -> None:
        """Keep the first ``new_len`` tokens of a sequence; later pages go back to the pool.

        Raises:
            OutOfRangeError: ``new_len`` greater than the sequence length.
            OutOfPagesError: the kept part of the last page is shared and must be copied.
        """
    def evict_pages(self, seq: int, page_indices: IntArray) -> None:
        """Evict whole pages from anywhere in a sequence.

        ``page_indices`` index the sequence's page list and are strictly increasing.
        Remaining tokens keep their original positions; later token indices shift down.
        """
    def seq_len(self, seq: int) -> int:
        """Tokens held by a sequence."""
    def positions(self, seq: int) -> npt.NDArray[np.int32]:
        """Original position of every token of a sequence, in token order (int32)."""
    def seq_pages(self, seq: int) -> npt.NDArray[np.int32]:
        """Page ids of a sequence, in token order (int32)."""
    def page_refcount(self, page: int) -> int:
        """Reference count of a page id (0 = free), for diagnostics.

        Raises:
            OutOfRangeError: ``page`` is not below ``capacity_pages``.
        """
    def page_table(
        self, seqs: IntArray
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """The CSR page table of a batch of sequences, in the given order.

        Returns:
            ``(indptr [batch+1], indices [nnz], last_page_len [batch])``, int32 (FlashInfer's
            convention; ``last_page_len`` is 0 for a sequence without pages).
        """
    def page_key_bounds(
        self, seq: int, layer: int, page_index: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Per-channel key ``(min, max)`` over the written slots of page ``page_index`` of
        a sequence at ``layer``, each float32 ``[num_kv_heads, head_dim]``.

        Raises:
            InvalidArgumentError: the cache was created with ``track_key_bounds=False``.
            OutOfRangeError: ``layer`` or ``page_index`` out of range.
        """
    def read_keys(self, seq: int, layer: int) -> npt.NDArray[np.float32]:
        """Stored keys of a sequence at a layer, float32 ``[seq_len, num_kv_heads, head_dim]``."""
    def read_values(self, seq: int, layer: int) -> npt.NDArray[np.float32]:
        """Stored values of a sequence at a layer, float32 ``[seq_len, num_kv_heads, head_dim]``."""
    def stats(self) -> dict[str, int]:
        """Memory statistics: ``pages_total``, ``pages_used``, ``pages_free``,
        ``bytes_per_page``, ``bytes_used``, ``bytes_reserved``, ``num_sequences``,
        ``num_tokens``."""
    def check_invariants(self) -> None:
        """Check every internal invariant (reference counts, free list, lengths).

        Raises:
            InternalError: naming the first violation.
        """
    def decode(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        *,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Decode attention: one query token per sequence, over all of its tokens.

        Args:
            layer: the layer whose K/V are read.
            seqs: the batch's sequences (repeats allowed).
            q: ``[len(seqs), num_qo_heads, head_dim]`` float32 or float16.
            scale: multiplier of q·k (default ``1/sqrt(head_dim)``).
            logit_soft_cap: if ``c > 0``, scores become ``c * tanh(score / c)``.
            rope: required for a ``key_rope="pre"`` cache, whose queries are then given
                before RoPE and rotated at the position of the sequence's last token
                (ignored for ``"post"`` caches).
            chunk_size: tokens per work chunk (flash-decoding split); None picks one.
            out_dtype: ``"f32"`` or ``"f16"``.

        Returns:
            ``(out, lse)``: ``out`` like ``q`` in ``out_dtype``; ``lse`` float32
            ``[len(seqs), num_qo_heads]``.
        """
    def prefill(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        qo_indptr: IntArray,
        *,
        causal: bool = True,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Prefill attention: the new tokens' queries against the cache.

        Rows ``qo_indptr[b] .. qo_indptr[b+1]`` of ``q`` (``[total, num_qo_heads,
        head_dim]``) are the queries of ``seqs[b]`` and are its last tokens (append and write
        them first). With ``causal``, query ``i`` of ``n`` sees tokens ``0 ..= seq_len - n +
        i``; without, every token. Other arguments as in :meth:`decode`.

        Returns:
            ``(out, lse)``: ``out`` like ``q``; ``lse`` float32 ``[total, num_qo_heads]``.
        """

def paged_decode(
    k_pages: FloatArray,
    v_pages: FloatArray,
    indptr: IntArray,
    indices: IntArray,
    last_page_len: IntArray,
    q: FloatArray,
    *,
    layout: str = "nhd",
    positions: IntArray | None = None,
    key_rope: str = "post",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    rope: RopeConfig | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Decode attention over K/V pages the engine owns, read in place (no copy).

    Args:
        k_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` (layout ``"nhd"``) or
            ``[num_pages, num_kv_heads, page_size, head_dim]`` (``"hnd"``), float32 or
            float16, any non-negative strides with a contiguous head_dim (for example
            ``kv[:, 0]`` of a combined ``[num_pages, 2, ...]`` array).
        v_pages: same shape and dtype as ``k_pages``.
        indptr, indices, last_page_len: the batch's CSR page table (int32 values):
            sequence ``b`` holds pages ``indices[indptr[b]:indptr[b+1]]``, the last one
            filled to ``last_page_len[b]`` (0 for a sequence without pages).
        q: ``[batch, num_qo_heads, head_dim]``.
        positions: optional original position of every slot, ``[num_pages * page_size]``
            indexed ``page * page_size + slot``; without it a token's position is its
            index in its sequence.
        key_rope: ``"pre"`` if the keys are stored before RoPE (then ``rope`` is required,
            ``q`` is before RoPE too, and each query is rotated at its token's position).
        Others: as in :meth:`KvCache.decode`.

    The page arrays must not be written while the call runs.

    Raises:
        OutOfRangeError: a page id outside ``0 .. num_pages`` (``indices[i]`` named).
        ShapeError, DTypeError, InvalidArgumentError: malformed pages, table or query.
    """

def paged_prefill(
    k_pages: FloatArray,
    v_pages: FloatArray,
    indptr: IntArray,
    indices: IntArray,
    last_page_len: IntArray,
    q: FloatArray,
    qo_indptr: IntArray,
    *,
    causal: bool = True,
    layout: str = "nhd",
    positions: IntArray | None = None,
    key_rope: str = "post",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    rope: RopeConfig | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Prefill attention over K/V pages the engine owns, read in place (no copy).

    Pages and table as in :func:`paged_decode`; ``q`` and ``qo_indptr`` as in
    :meth:`KvCache.prefill`.
    """

def merge_states(
    v_a: FloatArray,
    lse_a: FloatArray,
    v_b: FloatArray,
    lse_b: FloatArray,
    *,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Merge two partial attention results over disjoint key sets by their LSEs.

    Args:
        v_a, v_b: normalised outputs ``[n, heads, head_dim]``.
        lse_a, lse_b: their LSEs ``[n, heads]`` (natural log; ``-inf`` = no keys).

    Returns:
        ``(v, lse)``: attention over the union of the two key sets.
    """

def apply_rope(
    x: FloatArray,
    positions: IntArray,
    theta: float,
    style: str = "half_split",
    rotary_dim: int = 0,
    position_scale: float = 1.0,
    *,
    inplace: bool = False,
) -> FloatArray:
    """Rotary position embedding on ``x`` (``[n, heads, head_dim]``), token ``i`` at
    ``positions[i]``; parameters as in :class:`RopeConfig`.

    Returns a new array of ``x``'s dtype, or with ``inplace=True`` rotates ``x`` itself
    (which must be writable, with non-negative strides) and returns it.
    """

def isa() -> str:
    """The SIMD instruction set the CPU kernels use on this machine (e.g. ``"avx2+fma+f16c"``)."""
