"""The kvsieve extension module, ``kvsieve._kvsieve`` (use it through ``kvsieve``).

This stub is also where its documentation lives: the docstrings the classes and functions
show at run time (``help(kvsieve.KvCache.decode)``) are generated from it.

Conventions shared by every call:

* Float arrays are numpy arrays of float32 or float16, with any non-negative strides
  (transposed or sliced views are read in place, without a copy). Arguments other than
  engine-owned pages that have negative strides are copied first. float64 arrays are
  accepted wherever float32 is, as a float32 copy (for engine-owned pages too, so pass
  those as float32 or float16 to keep them uncopied); other dtypes raise
  :class:`DTypeError`.
* Integer arguments (sequence ids, slots, page tables, positions) are sequences of Python
  ints or 1-D integer numpy arrays.
* Queries are ``[tokens, num_qo_heads, head_dim]`` with ``num_qo_heads`` a multiple of
  ``num_kv_heads`` (query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``).
* ``scale`` defaults to ``1 / sqrt(head_dim)``; the LSE is the natural log of the sum of
  ``exp(score)``; a query that sees no key gets a zero output and an LSE of ``-inf``.
* ``position_mode`` numbers key and query positions when RoPE is applied at read time
  (keys stored before RoPE, ``key_rope="pre"``): ``"original"`` (positions as stored; the
  query at its own token's position), ``"contiguous"`` (StreamingLLM: the tokens a KV head
  reads are numbered 0, 1, ... in cache order, and a query sits at the count of those
  below its own token) or ``"capped"`` (LM-Infinite: a key at distance ``d`` from the query
  is rotated as if at distance ``min(d, max_distance)``; ``max_distance`` is required with
  ``"capped"`` and refused otherwise). With keys stored after RoPE only ``"original"`` is
  accepted.
* Token indices (selections, ``keep=`` lists) count a sequence's tokens in cache order,
  from 0; they are uint32 and strictly ascending within each head.
* Every error is a :class:`KvsieveError` subclass; a call that raises changed nothing.
* The GIL is released while kvsieve works, so calls from several Python threads run in
  parallel (a :class:`KvCache` serialises writers and lets readers share it).
"""

import enum
import os
from typing import Any, ClassVar, Sequence, Union

import numpy as np
import numpy.typing as npt

FloatArray = Union[npt.NDArray[np.float32], npt.NDArray[np.float16], npt.NDArray[np.float64]]
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
    OUT_OF_MEMORY = 13

class KvsieveError(Exception):
    """Base class of every error raised by kvsieve.

    kvsieve always raises one of the subclasses below, one per :class:`ErrorCode`; each
    carries, as class attributes, ``code`` (the stable :class:`ErrorCode` of its kind) and
    ``code_name`` (its short lowercase name: ``"shape"``, ``"out_of_pages"``, ...). The
    message names the parameter at fault and what was expected.

    Kinds with a built-in counterpart derive from it too, so ``except ValueError`` and the
    like catch them: :class:`InvalidArgumentError` and :class:`ShapeError` derive from
    ``ValueError``, :class:`DTypeError` from ``TypeError``, :class:`UnknownSequenceError`
    from ``KeyError``, :class:`OutOfRangeError` from ``IndexError``, and
    :class:`OutOfPagesError` and :class:`OutOfMemoryError` from ``MemoryError``. A panic
    inside kvsieve (a bug) raises :class:`InternalError`.
    """

    code: ClassVar[ErrorCode]
    code_name: ClassVar[str]

class InvalidArgumentError(KvsieveError, ValueError):
    """An argument has a value outside what the call accepts (also a ``ValueError``)."""

class ShapeError(KvsieveError, ValueError):
    """An array has the wrong shape or strides (also a ``ValueError``)."""

class DTypeError(KvsieveError, TypeError):
    """An array (or another argument) has a type the call does not accept (also a
    ``TypeError``)."""

class NullPointerError(KvsieveError):
    """A required buffer was missing."""

class UnknownSequenceError(KvsieveError, KeyError):
    """A sequence id the cache does not hold (also a ``KeyError``, whose ``str()`` is the
    plain message)."""

class OutOfRangeError(KvsieveError, IndexError):
    """An index (token, slot, page, layer, head) is out of range (also an ``IndexError``)."""

class OutOfPagesError(KvsieveError, MemoryError):
    """The page pool has too few free pages for the request (also a ``MemoryError``)."""

class UnsupportedError(KvsieveError):
    """A configuration kvsieve does not support (for example a head_dim)."""

class CudaUnavailableError(KvsieveError):
    """The CUDA driver or device is not available."""

class IoError(KvsieveError):
    """Reading or writing a file failed, or its contents are malformed."""

class ParseError(KvsieveError):
    """Text (such as a policy) could not be parsed.

    Raised by kvsieve, an instance carries ``offset``: the byte offset (in the UTF-8 text)
    of the offending token, or the text's length when it ended too early.
    """

    offset: int

class InternalError(KvsieveError):
    """A bug inside kvsieve (a failed :meth:`KvCache.check_invariants`, or a panic, whose
    message follows ``"panic: "``). Please report it."""

class OutOfMemoryError(KvsieveError, MemoryError):
    """Memory for a buffer the call needs could not be allocated; the call changed nothing
    (also a ``MemoryError``)."""

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
    def num_layers(self) -> int:
        """Number of layers."""
    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
    @property
    def head_dim(self) -> int:
        """Channels per head."""
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

class Selection:
    """Which cached tokens each KV head of one (sequence, layer) reads.

    CSR over KV heads: head ``h`` reads ``indices[head_indptr[h]:head_indptr[h + 1]]``,
    strictly ascending token indices below ``seq_len``. Query heads of a GQA group share
    their KV head's tokens. Immutable; equal selections compare equal and hash alike.

    Make one with the static constructors below, :func:`streaming`, :func:`lambda_mask`,
    :func:`page_bounds` or :meth:`Policy.select`.
    """

    @staticmethod
    def from_csr(seq_len: int, head_indptr: IntArray, indices: IntArray) -> Selection:
        """A selection from its CSR arrays.

        Raises:
            ShapeError: ``head_indptr`` with fewer than 2 entries.
            InvalidArgumentError: ``head_indptr`` not starting at 0, decreasing, or not ending
                at ``len(indices)``; a head's indices not strictly ascending (``indices``
                named, with the position).
            OutOfRangeError: an index ``>= seq_len`` or negative (``indices[i]`` named).
        """
    @staticmethod
    def from_heads(seq_len: int, heads: Sequence[IntArray]) -> Selection:
        """A selection from one strictly ascending token list per KV head.

        Raises:
            InvalidArgumentError: no heads; a list not strictly ascending (``heads[h][i]``).
            OutOfRangeError: an index ``>= seq_len`` or negative (``heads[h][i]``).
        """
    @staticmethod
    def dense(num_kv_heads: int, seq_len: int) -> Selection:
        """Every token for every head.

        Raises:
            InvalidArgumentError: ``num_kv_heads`` 0.
        """
    @staticmethod
    def same_for_all_heads(num_kv_heads: int, seq_len: int, tokens: IntArray) -> Selection:
        """The same strictly ascending token list for every head (checked as in
        :meth:`from_heads`, ``tokens[i]`` named)."""
    @property
    def num_kv_heads(self) -> int:
        """Number of KV heads."""
    @property
    def seq_len(self) -> int:
        """Tokens in the sequence the selection was made for."""
    @property
    def head_indptr(self) -> npt.NDArray[np.uint32]:
        """The CSR offsets, uint32 ``[num_kv_heads + 1]`` (a copy)."""
    @property
    def indices(self) -> npt.NDArray[np.uint32]:
        """Every head's token indices, concatenated in head order, uint32 (a copy)."""
    def head(self, h: int) -> npt.NDArray[np.uint32]:
        """Token indices read by KV head ``h``, uint32, strictly ascending.

        Raises:
            OutOfRangeError: ``h`` not in ``0 .. num_kv_heads``.
        """
    def len(self) -> int:
        """Selected tokens summed over heads (also ``len(selection)``)."""
    def __len__(self) -> int: ...
    def is_empty(self) -> bool:
        """Whether no head reads any token."""
    def is_dense(self) -> bool:
        """Whether every head reads every token."""
    def union(self, other: Selection) -> Selection:
        """Per head, the tokens read by either selection.

        Raises:
            InvalidArgumentError: ``other`` has another ``num_kv_heads`` or ``seq_len``.
        """
    def intersection(self, other: Selection) -> Selection:
        """Per head, the tokens read by both selections (errors as :meth:`union`)."""
    def stats(self) -> dict[str, Any]:
        """``seq_len``; ``per_head`` (list of kept counts); ``total``; ``density``
        (``total / (num_kv_heads * seq_len)``); ``min_density`` and ``max_density`` over
        heads (densities are 0.0 when ``seq_len`` is 0)."""
    def __eq__(self, other: object) -> bool: ...

class Policy:
    """A selection policy for every (layer, KV head) of a model, from its text form.

    A spec says what one KV head reads: ``dense``, or the union of ``sinks=N`` (the first N
    tokens), ``window=N`` (the last N), ``pages=N`` (page bounds to N tokens, with
    optional ``min_pages=N``) and ``clusters=N`` (centroid retrieval to N tokens from the
    (sequence, layer)'s index in a :class:`ClusterIndexSet`, with optional
    ``clusters_k=K`` clusters per head or ``cluster_size=S`` tokens per cluster, default 16,
    and ``hier=C`` for a hierarchical lookup through C coarse clusters that opens the best
    ones until they hold twice the budget) and ``topk=N`` (the N tokens outside the sinks
    and window whose stored keys score highest by raw ``q·k``, ReAttention's position-free
    top-k), with ``span=S`` growing each retrieved token of ``topk``/``pages``/``clusters``
    into the S tokens around it (up to the item's budget), plus
    ``positions=original|contiguous|capped`` and ``max_distance=N``; ``global=N`` /
    ``local=N`` are ``sinks`` / ``window`` that also set
    ``positions=capped`` (LM-Infinite). Clauses are separated by ``;``: one default spec,
    ``layers=a-b,c:spec`` overrides and ``heads=layer.head,...:spec`` overrides (later
    clauses of a kind win; a head override beats a layer override). Empty text means dense.
    Examples::

        sinks=4,window=1024,pages=2048;layers=0-1:dense;heads=2.0,2.5:sinks=4,window=256
        global=4,local=4096,max_distance=4096
        sinks=4,window=64,clusters=512,cluster_size=16,hier=16;layers=0-1:dense
        sinks=32,window=256,topk=1024,span=32,positions=contiguous

    ``str(policy)`` is the canonical text, which parses back to an equal policy. Parsing
    checks syntax only; :meth:`validate` checks against a model. Policies compare equal and
    hash by value.

    Args:
        text: the text form.

    Raises:
        ParseError: malformed text; the exception's ``offset`` is the byte offset of the
            offending token.
    """

    def __init__(self, text: str) -> None: ...
    @staticmethod
    def parse(text: str) -> Policy:
        """Same as ``Policy(text)``."""
    def validate(self, num_layers: int, num_kv_heads: int) -> None:
        """Check the policy against a model: layers and heads in range, ``window``,
        ``pages``, ``clusters`` and ``max_distance`` at least 1, a spec that selects
        something, ``min_pages`` only with ``pages``, ``clusters_k`` / ``cluster_size``
        (not both) and ``hier`` only with ``clusters``, ``topk`` and ``span`` at least 1 and
        ``span`` only with ``topk``, ``pages`` or ``clusters``, ``max_distance`` exactly with
        ``capped``, one position mode for all heads of a layer, and one set of cluster
        options for the heads of a layer that use ``clusters=``.

        Raises:
            InvalidArgumentError: a bad spec (the message names its clause).
            OutOfRangeError: a layer or head the model does not have (clause named).
        """
    def select(self, cache: KvCache, seq: int, layer: int, q: FloatArray) -> Selection:
        """The tokens each KV head of ``layer`` reads for the decode query ``q`` of ``seq``.

        Args:
            q: ``[num_qo_heads, head_dim]`` or ``[1, num_qo_heads, head_dim]``, the query as
                attention takes it (page-bound scores aggregate a GQA group's queries).

        Raises:
            InvalidArgumentError, OutOfRangeError: the policy does not fit the cache; page
                bounds on a cache without key bounds or with pre-RoPE keys.
            OutOfRangeError: ``layer`` out of range.
            UnknownSequenceError, ShapeError: a bad ``seq`` or ``q``.
        """
    def position_mode(self, layer: int) -> tuple[str, int | None]:
        """``(position_mode, max_distance)`` attention uses at ``layer``, as the
        ``position_mode=`` / ``max_distance=`` arguments take them (``max_distance`` is
        None unless the mode is ``"capped"``)."""
    def is_dense(self, layer: int) -> bool:
        """Whether every head of ``layer`` is dense (so attention needs no selection)."""
    def spec(self, layer: int, head: int) -> str:
        """The canonical text of the spec KV head ``head`` of ``layer`` gets."""
    def window_pages_to_evict(
        self, num_layers: int, num_kv_heads: int, seq_len: int, page_size: int
    ) -> npt.NDArray[np.int64]:
        """Pages of a sequence (indices into its page list) that no (layer, head) reads
        again: when every spec is sinks and a window alone, the pages outside the largest
        sinks and the largest window; otherwise none. See :meth:`KvCache.evict_for_policy`.

        Raises:
            InvalidArgumentError, OutOfRangeError: the policy fails :meth:`validate`.
        """
    def __eq__(self, other: object) -> bool: ...

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
            k: ``[n, num_kv_heads, head_dim]`` float32 or float16 (or float64), any strides.
            v: same shape as ``k``, float32 or float16 (or float64).

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
        position_mode: str = "original",
        max_distance: int | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Decode attention: one query token per sequence, over all of its tokens.

        Args:
            layer: the layer whose K/V are read.
            seqs: the batch's sequences (repeats allowed).
            q: ``[len(seqs), num_qo_heads, head_dim]`` float32 or float16 (or float64).
            scale: multiplier of q·k (default ``1/sqrt(head_dim)``).
            logit_soft_cap: if ``c > 0``, scores become ``c * tanh(score / c)``.
            rope: required for a ``key_rope="pre"`` cache, whose queries are then given
                before RoPE and rotated at the position of the sequence's last token
                (ignored for ``"post"`` caches).
            position_mode, max_distance: position numbering for RoPE at read time (see the
                module docs); only ``"original"`` on a ``"post"`` cache.
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
        position_mode: str = "original",
        max_distance: int | None = None,
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
    def decode_sparse(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        selections: Sequence[Selection],
        *,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        position_mode: str = "original",
        max_distance: int | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Sparse decode: KV head ``h`` of ``seqs[b]`` reads only ``selections[b].head(h)``.

        The result equals dense attention over exactly the selected tokens (query heads of a
        GQA group share their KV head's tokens; a head that reads nothing gives a zero
        output and an LSE of ``-inf``). With a ``key_rope="pre"`` cache the query is given
        before RoPE and rotated at its token's position as ``position_mode`` numbers it.

        Args:
            selections: one :class:`Selection` per sequence, made for that sequence's
                current length and the cache's ``num_kv_heads``.
            Others: as in :meth:`decode`.

        Raises:
            ShapeError: not one selection per sequence, or a selection with another number
                of KV heads (``selections[b]`` named).
            InvalidArgumentError: a selection made for another ``seq_len``
                (``selections[b]`` named).
            DTypeError: an item that is not a :class:`Selection`.
        """
    def prefill_sparse(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        qo_indptr: IntArray,
        selections: Sequence[Selection],
        windows: Sequence[tuple[int, int] | None] | None = None,
        *,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        position_mode: str = "original",
        max_distance: int | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Sparse causal prefill: query row ``i`` of ``seqs[b]`` (token ``qt``) reads, per KV
        head ``h``, the tokens ``t <= qt`` of ``selections[b].head(h)``, further restricted
        by ``windows[h]`` when given.

        Args:
            windows: None (no row mask), or one entry per KV head: None, or
                ``(sinks, window)``: the row of token ``qt`` then only sees ``t < sinks`` or
                ``qt - t < window`` (token indices; LM-Infinite's Λ-mask, StreamingLLM's
                window). ``window`` is at least 1.
            Others: as in :meth:`prefill` and :meth:`decode_sparse`. With
                ``position_mode="contiguous"`` the numbering counts every selected token of
                the head, whatever the row window hides.

        Raises:
            ShapeError: ``windows`` not one entry per KV head.
            InvalidArgumentError: a window of 0 (``windows[h].window`` named) or an entry
                that is not None or a pair of ints.
        """
    def decode_with_policy(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        policy: Policy | str,
        *,
        clusters: ClusterIndexSet | None = None,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32], list[Selection]]:
        """Decode under a policy: per sequence, :meth:`Policy.select` chooses each KV head's
        tokens for that sequence's query, then :meth:`decode_sparse` reads exactly those,
        with the layer's position mode (:meth:`Policy.position_mode`). A layer whose heads
        are all dense runs dense decode.

        Args:
            policy: a :class:`Policy` or its text form.
            clusters: the :class:`ClusterIndexSet` a policy with ``clusters=`` reads: heads
                with ``clusters=N`` also read the best clusters of the sequence's index at
                this layer up to N tokens, plus the tokens the index does not cover yet.
                With a cache storing keys before RoPE, ``rope`` is required and a copy of
                ``q`` is rotated for scoring: to ``max_distance`` against an index of the
                cache's raw keys under capped positions (unrotated under contiguous
                positions), or to the query's position
                against a set built from a twin cache of post-RoPE keys.
            Others: as in :meth:`decode`.

        Returns:
            ``(out, lse, selections)``: ``selections`` holds one :class:`Selection` per
            sequence, or is empty for a dense layer.

        Raises:
            ParseError: ``policy`` is malformed text.
            InvalidArgumentError, OutOfRangeError: the policy does not fit the cache
                (:meth:`Policy.validate`; the message names the clause), or page bounds on a
                cache without key bounds or with pre-RoPE keys; ``clusters=`` without
                ``clusters``, or with no index for a sequence (call
                :meth:`ClusterIndexSet.build`), or with an index covering more tokens than
                the sequence holds (truncated or compacted since: build again).
        """
    def decode_with_clusters(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        policy: Policy | str,
        clusters: ClusterIndexSet,
        *,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32], list[Selection], list[int], list[int]]:
        """:meth:`decode_with_policy` with the index set required, also returning what the
        retrieval read per sequence: ``(out, lse, selections, centroids_scored,
        radii_read)``. ``centroids_scored`` counts centroid rows (fine clusters scored plus
        every coarse centroid under ``hier=``, summed over the KV heads that retrieve; each
        ``head_dim`` floats); ``radii_read`` the cluster radii ``rank=mixed`` read (one float
        per fine cluster scored, else 0)."""
    def prefill_with_policy(
        self,
        layer: int,
        seqs: IntArray,
        q: FloatArray,
        qo_indptr: IntArray,
        policy: Policy | str,
        *,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        rope: RopeConfig | None = None,
        chunk_size: int | None = None,
        out_dtype: str = "f32",
    ) -> tuple[FloatArray, npt.NDArray[np.float32]]:
        """Causal prefill under a policy, with the layer's position mode. Per KV head, a spec
        made of sinks and a window alone becomes a row window ``(sinks, window)`` as in
        :meth:`prefill_sparse`; any other spec (dense, or with page bounds, which choose
        tokens per decode query) attends every earlier token. Under
        ``positions=contiguous`` a sparse spec instead reads, per call (a chunk of new
        tokens), its sinks, the ``window - 1`` tokens before the chunk, the chunk itself
        (causally) and, with ``topk=``, the best tokens for the chunk's queries (per query
        head its mean over the chunk; in spans with ``span=``), numbered contiguously over
        that list (InfLLM's chunk rule): a one-token chunk reads exactly what decode reads,
        and a chunk's attention reads a bounded number of tokens (``topk=`` adds a scan of
        the keys). Results depend on the chunk size: keep chunks at most the window.
        """
    def evict_for_policy(self, seq: int, policy: Policy | str) -> int:
        """Evict the pages of a sequence that the policy never reads again; returns how many.

        Only a policy whose every (layer, head) spec is sinks and a window alone has such
        pages (see :meth:`Policy.window_pages_to_evict`); for any other policy this evicts
        nothing. Remaining tokens keep their original positions, so memory stays bounded
        over an arbitrarily long stream.

        Raises:
            ParseError, InvalidArgumentError, OutOfRangeError: a malformed policy or one
                that does not fit the cache.
            UnknownSequenceError: ``seq`` is not in the cache.
        """
    def compact(self, seq: int, keep: IntArray | Sequence[IntArray], per: str = "all") -> None:
        """Keep only some tokens of a sequence, moved into fresh pages in order, with their
        original positions; the old pages go back to the pool (or stay with the sequences
        sharing them). Slot ``i`` of the compacted sequence holds each list's ``i``-th token.

        Args:
            keep: with ``per="all"``, one strictly ascending token list for every layer and
                KV head; with ``per="layer"``, one list per layer; with ``per="head"``, one
                list per (layer, KV head), layer-major (``keep[layer * num_kv_heads + h]``).
                All lists have the same length. Lists that differ need a ``key_rope="post"``
                cache (slot positions come from the first list).
            per: ``"all"``, ``"layer"`` or ``"head"``.

        Raises:
            ShapeError: the wrong number of lists, or lists of different lengths.
            InvalidArgumentError: a list not strictly ascending or an index past the
                sequence (``keep[i][j]`` named), differing lists on a pre-RoPE cache, or an
                unknown ``per``.
            OutOfRangeError: a negative index.
            OutOfPagesError: fewer free pages than ``ceil(len(list) / page_size)``.
        """

class ClusterThresholds:
    """Thresholds from :meth:`ClusterIndex.calibrate`, one per KV head, and the fractions
    of clustered keys they keep on the calibration queries. Pass it as ``threshold=`` to
    :meth:`ClusterIndex.retrieve`; ``len()`` is the number of KV heads."""

    @property
    def per_head(self) -> npt.NDArray[np.float64]:
        """τ per KV head (all equal unless calibrated with ``per_head=True``)."""
    @property
    def kept_fraction(self) -> npt.NDArray[np.float64]:
        """Mean kept fraction of the clustered keys per KV head on the calibration queries."""
    @property
    def target(self) -> float:
        """The ``target_fraction`` asked for."""
    @property
    def per_head_mode(self) -> bool:
        """Whether each head was calibrated on its own."""
    def mean_kept_fraction(self) -> float:
        """:attr:`kept_fraction` averaged over heads."""
    def __len__(self) -> int: ...

class ClusterIndexSet:
    """The cluster indexes a policy with ``clusters=`` reads: one :class:`ClusterIndex`
    per (sequence, layer), owned by the engine and passed to
    :meth:`KvCache.decode_with_policy` as ``clusters=``.

    Keys: a cache of post-RoPE keys is clustered as stored and the query scored after RoPE
    at its position; a cache of pre-RoPE keys is clustered raw and, under
    ``positions=capped,max_distance=M``, the query is scored rotated to position ``M`` (the
    logit attention gives a token at the capped distance). Other position modes on a
    pre-RoPE cache need a set built from a twin cache of post-RoPE keys.

    Staleness rule: :meth:`build` after a sequence's prefill clusters every layer whose
    policy uses ``clusters=``, leaving out the smallest ``window=`` of that layer's cluster
    heads. Tokens appended later are in no cluster and are always read, so nothing new is
    missed; :meth:`update` assigns those that have left the window to their nearest
    centroid. After a truncation or compaction decoding fails naming the index: build
    again. Thread-safe: decoding shares the set; build, update and remove take it
    exclusively.

    Args:
        seed: k-means++ seed of the indexes it builds.
    """

    def __init__(self, seed: int = 0) -> None: ...
    def build(self, cache: KvCache, seq: int, policy: Policy | str) -> int:
        """Build (or rebuild) the indexes of ``seq`` from ``cache``'s keys (as stored, or
        raw for a pre-RoPE cache) for every layer where ``policy`` uses ``clusters=``;
        returns the number of layers indexed (0 for a policy without ``clusters=``). The
        set changes only if every layer succeeds.

        Raises:
            InvalidArgumentError: an empty sequence (``seq``), or a policy that fails
                validation.
            UnknownSequenceError: ``seq`` is not in the cache.
        """
    def update(self, cache: KvCache, seq: int) -> int:
        """Assign the tokens of ``seq`` appended since the last build or update, and that
        have left the window, to their nearest centroids in every layer (all or none);
        returns the tokens assigned per head, summed over layers.

        Raises:
            InvalidArgumentError: the sequence is shorter than an index covers (``keys``
                named: rebuild).
        """
    def remove_sequence(self, seq: int) -> int:
        """Drop every index of ``seq``; returns how many there were."""
    def get(self, seq: int, layer: int) -> ClusterIndex | None:
        """A copy of the index of (``seq``, ``layer``), or None."""
    def keys(self) -> list[tuple[int, int]]:
        """The (sequence, layer) pairs indexed, in order."""
    def __len__(self) -> int: ...

class ClusterIndex:
    """K-means clusters of the keys of one (sequence, layer), every KV head, for centroid
    retrieval (Squeezed Attention).

    Per KV head the keys of tokens ``0 .. clustered_len`` are clustered by cosine (keys
    scaled to unit length; k-means++ seeding from ``seed``, then Lloyd iterations, empty
    clusters repaired). Each cluster keeps its raw centroid ``C_c`` (the mean of its
    members' raw keys, what queries are scored against), its size ``N_c`` and its members.

    For a decode query, the estimated attention one key of cluster ``c`` of KV head ``h``
    receives is ``s_c = mean_j exp(q_j·C_c/√d) / Σ_i N_i exp(q_j·C_i/√d)`` over the query
    heads ``j`` of the head's GQA group (so ``Σ_c N_c s_c = 1``). :meth:`retrieve` keeps
    the clusters with ``s_c > threshold``, or the best clusters (higher ``s_c`` first,
    lower cluster index on ties) up to a token budget, the last one cut to its lowest
    token indices.

    A coarse level (``coarse=``) is a K-means over each head's fine centroids; a
    hierarchical lookup scores the coarse centroids, opens the promising coarse clusters
    and scores only their children, so its cost follows what is kept.

    Tokens ``clustered_len .. seq_len`` (the excluded window, or tokens appended since the
    last update) are in no cluster and never retrieved: union a window selection
    (:func:`streaming`). Thread-safe: lookups share the index, :meth:`assign_new` and
    :meth:`rebuild` take it exclusively.
    """

    @staticmethod
    def build(
        keys: FloatArray | None = None,
        *,
        cache: KvCache | None = None,
        seq: int | None = None,
        layer: int | None = None,
        clusters: int | float,
        max_iter: int = 20,
        seed: int = 0,
        exclude_window: int = 0,
        coarse: int | float | None = None,
    ) -> ClusterIndex:
        """Cluster every KV head of the keys.

        Args:
            keys, cache, seq, layer: the keys, from exactly one source, as in
                :func:`gemfilter_scores` (an array ``[n, num_kv_heads, head_dim]`` after
                RoPE, or a ``key_rope="post"`` cache's sequence at one layer).
            clusters: fine clusters per KV head: an int (``1 ..=`` tokens clustered) or a
                float fraction in ``(0, 1]`` of the tokens clustered (rounded; at least 1).
            max_iter: Lloyd iterations at most (fine and coarse).
            seed: k-means++ seed, ``0 ..= 2**64 - 1`` (every head uses it).
            exclude_window: leave the last ``exclude_window`` tokens out (the observation
                window a local selection reads anyway); the same trailing window stays out
                after :meth:`assign_new`.
            coarse: coarse clusters per KV head over the fine centroids (an int, or a float
                fraction of the fine clusters), or None for no coarse level.

        Raises:
            InvalidArgumentError: an empty context (``keys`` or ``seq`` named);
                ``exclude_window`` leaving no token; ``clusters`` 0 or more than the tokens
                clustered, or a fraction outside ``(0, 1]`` or rounding to 0; ``coarse`` 0
                or more than the fine clusters; a NaN or infinite key (``keys`` named, with
                the token and head); key sources as in :func:`gemfilter_scores`.
            OutOfRangeError: a negative count or ``seed``.
            DTypeError: ``clusters`` / ``coarse`` neither an int nor a float.
            ShapeError, UnsupportedError, UnknownSequenceError: as :func:`gemfilter_scores`.
        """
    @staticmethod
    def load(path: str | os.PathLike[str]) -> ClusterIndex:
        """Read an index written by :meth:`save`, verifying the format, version, checksum
        and every invariant.

        Raises:
            IoError: a missing, unreadable, truncated, corrupted or foreign file.
        """
    @staticmethod
    def load_for(
        path: str | os.PathLike[str],
        keys: FloatArray | None = None,
        *,
        cache: KvCache | None = None,
        seq: int | None = None,
        layer: int | None = None,
    ) -> ClusterIndex:
        """:meth:`load`, then check that the index fits the keys: the same
        ``num_kv_heads`` and ``head_dim``, and a sequence at least as long as the index
        covers.

        Raises:
            IoError: as :meth:`load`, or an index that does not fit the keys.
            InvalidArgumentError, ShapeError, ...: bad key sources, as :func:`gemfilter_scores`.
        """
    @staticmethod
    def from_bytes(data: bytes) -> ClusterIndex:
        """Parse the bytes of :meth:`to_bytes` (a saved file's contents); errors as :meth:`load`."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path``: a safetensors file of the centroids, sizes, member
        lists, coarse level and build options, versioned and checksummed.

        Raises:
            IoError: the file cannot be written.
        """
    def to_bytes(self) -> bytes:
        """The bytes :meth:`save` writes."""
    @property
    def num_kv_heads(self) -> int:
        """KV heads the index covers."""
    @property
    def head_dim(self) -> int:
        """Channels per key."""
    @property
    def num_clusters(self) -> int:
        """Fine clusters per KV head."""
    @property
    def num_coarse_clusters(self) -> int:
        """Coarse clusters per KV head (0 without a coarse level)."""
    @property
    def seq_len_at_build(self) -> int:
        """Sequence length when the index was built (or last rebuilt)."""
    @property
    def seq_len(self) -> int:
        """Sequence length when the index was built or last updated by :meth:`assign_new`."""
    @property
    def clustered_len(self) -> int:
        """Tokens ``0 .. clustered_len`` are in clusters."""
    @property
    def config(self) -> dict[str, Any]:
        """The build options: ``clusters`` and ``coarse`` (int, float fraction, or None for
        ``coarse``), ``exclude_window``, ``max_iter``, ``seed``."""
    def centroids(self, h: int) -> npt.NDArray[np.float32]:
        """Raw-key means of the clusters of KV head ``h``, ``[num_clusters, head_dim]``
        (what queries are scored against; they do not move in :meth:`assign_new`).

        Raises:
            OutOfRangeError: ``h`` not in ``0 .. num_kv_heads`` (also for the methods below).
        """
    def centroids_normalized(self, h: int) -> npt.NDArray[np.float32]:
        """Unit centroids of KV head ``h`` used for assignment, ``[num_clusters, head_dim]``."""
    def sizes(self, h: int) -> npt.NDArray[np.uint32]:
        """Tokens in each cluster of KV head ``h``, ``[num_clusters]`` (each at least 1)."""
    def radii(self, h: int) -> npt.NDArray[np.float32]:
        """Each cluster's radius for KV head ``h``, ``[num_clusters]``: the largest distance of
        a member's raw key to the raw centroid (grown by :meth:`assign_new`), which
        ``rank="mixed"`` ranks by. Empty for an index without radii (built on a GPU, or
        loaded from a version 1 file)."""
    def member_offsets(self, h: int) -> npt.NDArray[np.uint32]:
        """CSR offsets into ``members(h)``, ``[num_clusters + 1]``."""
    def members(self, h: int, c: int | None = None) -> npt.NDArray[np.uint32]:
        """The token indices (ascending) of cluster ``c`` of KV head ``h``, or with
        ``c=None`` every cluster's members concatenated in cluster order
        (``[clustered_len]``).

        Raises:
            OutOfRangeError: ``c`` not in ``0 .. num_clusters``.
        """
    def assignment(self, h: int) -> npt.NDArray[np.uint32]:
        """The cluster of each clustered token of KV head ``h``, ``[clustered_len]``."""
    def diagnostics(self, h: int) -> dict[str, Any]:
        """Build diagnostics of KV head ``h``: ``inertia`` (``Σ ‖x̂ − ĉ‖²`` in unit-key
        space), ``inertia_history`` (after the first assignment and each iteration; only
        the final value for a loaded index), ``iterations``, ``converged`` (the last pass
        changed nothing, so every key sits at a nearest unit centroid), ``seeds``
        (k-means++ picks, uint32; empty for a loaded index)."""
    def coarse_level(self, h: int) -> dict[str, npt.NDArray[Any]] | None:
        """The coarse level of KV head ``h``: ``centroids`` (float32 ``[num_coarse_clusters,
        head_dim]``, size-weighted means of the children's raw centroids), ``sizes``
        (tokens beneath each, uint32), ``child_offsets`` (uint32 ``[num_coarse_clusters +
        1]``) and ``children`` (fine cluster ids, uint32 ``[num_clusters]``); None without a
        coarse level."""
    def cluster_estimates(self, q: FloatArray) -> npt.NDArray[np.float64]:
        """The estimates ``s_c`` of every fine cluster for a decode query ``q`` (after RoPE,
        ``[num_qo_heads, head_dim]`` or ``[1, num_qo_heads, head_dim]``), float64
        ``[num_kv_heads, num_clusters]``; errors as :meth:`retrieve`."""
    def retrieve(
        self,
        q: FloatArray,
        *,
        threshold: float | ClusterThresholds | Sequence[float] | npt.NDArray[np.floating] | None = None,
        budget: int | None = None,
        seq_len: int | None = None,
        hierarchical: bool = False,
        coarse_threshold: float | None = None,
        coarse_budget: int | None = None,
        coarse_budget_multiple: float | None = None,
        rank: str = "estimate",
    ) -> tuple[Selection, dict[str, Any]]:
        """Centroid retrieval for one decode query.

        Args:
            q: the query after RoPE, ``[num_qo_heads, head_dim]`` or ``[1, num_qo_heads,
                head_dim]``, ``num_qo_heads`` a positive multiple of ``num_kv_heads``.
            threshold: keep clusters with ``s_c > threshold`` (a negative value keeps every
                cluster): one float for every head, or one per KV head (a
                :class:`ClusterThresholds` or a sequence / 1-D array).
            budget: instead, keep exactly ``min(budget, clustered_len)`` tokens per head:
                clusters in rank order, whole, the first that does not fit giving its lowest
                token indices. Exactly one of ``threshold`` and ``budget``.
            seq_len: the length of the sequence the selection is for (default
                :attr:`seq_len`; at least that); tokens past :attr:`clustered_len` are not
                returned.
            hierarchical: score the coarse level first (the index needs ``coarse=``) and
                only the children of the coarse clusters opened by exactly one of:
            coarse_threshold: coarse clusters with estimate ``> coarse_threshold``;
            coarse_budget: the best coarse clusters until the tokens beneath them reach
                this many (the last may overshoot);
            coarse_budget_multiple: ``coarse_budget = ceil(m * budget)`` (needs ``budget``).
                With every coarse cluster opened the result equals the flat lookup's.
            rank: with ``budget``, how clusters fill it: ``"estimate"`` (by ``s_c``) or
                ``"mixed"``: alternately the best remaining cluster by ``s_c`` and by the
                upper bound ``max_j (q_j·C_c + |q_j|·r_c)/√d`` of its best member's logit
                (``r_c`` from :meth:`radii`), which finds a key that matches far better than
                its cluster-mates. ``"mixed"`` needs radii.

        Returns:
            ``(selection, stats)``: the :class:`Selection` and a dict of what the lookup
            cost and kept: ``centroid_evals`` (query-centroid dot products, summed over
            heads; ``coarse_evals + fine_evals``), ``coarse_evals``, ``fine_evals``, and per
            KV head ``clusters_scored``, ``clusters_kept``, ``coarse_kept`` and
            ``tokens_kept`` (lists).

        Raises:
            InvalidArgumentError: neither or both of ``threshold`` and ``budget``; a NaN
                threshold; ``budget`` 0; a coarse argument without ``hierarchical=True``,
                more than one or none with it, a NaN ``coarse_threshold``,
                ``coarse_budget`` 0, ``coarse_budget_multiple`` not positive or without
                ``budget``; ``hierarchical=True`` on an index without a coarse level; a
                non-finite ``q``.
            ShapeError: ``q`` of the wrong shape (another head_dim, heads not a multiple of
                ``num_kv_heads``); per-head thresholds not one per KV head.
            OutOfRangeError: ``seq_len`` shorter than :attr:`seq_len`; a negative budget.
            DTypeError: ``q`` not float32 / float16 / float64; ``threshold`` of another type.
        """
    def calibrate(self, queries: FloatArray, target_fraction: float, per_head: bool = False) -> ClusterThresholds:
        """Thresholds that keep on average ``target_fraction`` of the clustered keys on the
        calibration ``queries`` (``[m, num_qo_heads, head_dim]``, after RoPE): one cut over
        all heads, or one per head with ``per_head=True``. The cut falls between two
        distinct estimates, where the kept fraction is closest to the target.

        Raises:
            InvalidArgumentError: ``target_fraction`` outside ``(0, 1]``; non-finite queries.
            ShapeError: ``queries`` not ``[m >= 1, num_qo_heads, head_dim]`` as for
                :meth:`retrieve`.
        """
    def assign_new(
        self,
        keys: FloatArray | None = None,
        *,
        cache: KvCache | None = None,
        seq: int | None = None,
        layer: int | None = None,
    ) -> int:
        """Assign the tokens that arrived since the index was built or last updated
        (``clustered_len .. n - exclude_window``) to their nearest unit centroid, updating
        sizes, members and the coarse level; centroids do not move (call :meth:`rebuild`
        after many tokens). Returns the number of tokens assigned per head.

        Raises:
            ShapeError: keys with another ``num_kv_heads`` or ``head_dim`` (``keys`` or
                ``cache`` named).
            InvalidArgumentError: a sequence shorter than :attr:`seq_len` (truncated or
                compacted: rebuild); NaN or infinite keys; key sources as in
                :func:`gemfilter_scores`. On error the index is unchanged.
        """
    def rebuild(
        self,
        keys: FloatArray | None = None,
        *,
        cache: KvCache | None = None,
        seq: int | None = None,
        layer: int | None = None,
    ) -> None:
        """Cluster again from scratch with the same options over the keys' current tokens
        (the index is replaced only on success); errors as :meth:`build` and
        :meth:`assign_new`."""

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
    position_mode: str = "original",
    max_distance: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Decode attention over K/V pages the engine owns, read in place (no copy).

    Args:
        k_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` (layout ``"nhd"``) or
            ``[num_pages, num_kv_heads, page_size, head_dim]`` (``"hnd"``), float32 or
            float16, any non-negative strides with a contiguous head_dim (for example
            ``kv[:, 0]`` of a combined ``[num_pages, 2, ...]`` array). float64 pages are
            accepted but copied to float32 on every call.
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
        position_mode, max_distance: position numbering for RoPE at read time (module docs).
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
    position_mode: str = "original",
    max_distance: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Prefill attention over K/V pages the engine owns, read in place (no copy).

    Pages and table as in :func:`paged_decode`; ``q`` and ``qo_indptr`` as in
    :meth:`KvCache.prefill`.
    """

def paged_decode_sparse(
    k_pages: FloatArray,
    v_pages: FloatArray,
    indptr: IntArray,
    indices: IntArray,
    last_page_len: IntArray,
    q: FloatArray,
    selections: Sequence[Selection],
    *,
    layout: str = "nhd",
    positions: IntArray | None = None,
    key_rope: str = "post",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    rope: RopeConfig | None = None,
    position_mode: str = "original",
    max_distance: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Sparse decode over K/V pages the engine owns: KV head ``h`` of sequence ``b`` reads
    only ``selections[b].head(h)`` (token indices into that sequence, in page-table order).

    Pages and table as in :func:`paged_decode`; ``selections`` as in
    :meth:`KvCache.decode_sparse`.
    """

def paged_prefill_sparse(
    k_pages: FloatArray,
    v_pages: FloatArray,
    indptr: IntArray,
    indices: IntArray,
    last_page_len: IntArray,
    q: FloatArray,
    qo_indptr: IntArray,
    selections: Sequence[Selection],
    windows: Sequence[tuple[int, int] | None] | None = None,
    *,
    layout: str = "nhd",
    positions: IntArray | None = None,
    key_rope: str = "post",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    rope: RopeConfig | None = None,
    position_mode: str = "original",
    max_distance: int | None = None,
    chunk_size: int | None = None,
    out_dtype: str = "f32",
) -> tuple[FloatArray, npt.NDArray[np.float32]]:
    """Sparse causal prefill over K/V pages the engine owns.

    Pages and table as in :func:`paged_decode`; ``q``, ``qo_indptr``, ``selections`` and
    ``windows`` as in :meth:`KvCache.prefill_sparse`.
    """

def streaming(num_kv_heads: int, seq_len: int, sinks: int, window: int) -> Selection:
    """StreamingLLM: every head reads the first ``sinks`` tokens (attention sinks) and the
    last ``window`` tokens; overlapping ranges merge, so a short sequence is read whole.

    Raises:
        InvalidArgumentError: ``window`` 0 or ``num_kv_heads`` 0 (``sinks`` 0 is a plain
            sliding window).
    """

def lambda_mask(num_kv_heads: int, seq_len: int, global_: int, local: int) -> Selection:
    """LM-Infinite's Λ-mask for the sequence's last query: every head reads the first
    ``global_`` tokens and the last ``local`` tokens. Attend with
    ``position_mode="capped"`` to cap relative distances.

    Raises:
        InvalidArgumentError: ``local`` 0 or ``num_kv_heads`` 0.
    """

def page_bounds(cache: KvCache, seq: int, layer: int, q: FloatArray, budget_tokens: int, min_pages: int = 0) -> Selection:
    """Quest page bounds: per KV head, rank the sequence's pages by an upper bound of the
    query's logits (from each page's per-channel key min/max; a GQA group takes the largest
    of its queries' bounds) and keep the best pages until they hold ``budget_tokens``
    tokens, and at least ``min_pages`` pages. A sequence no longer than the budget is kept
    whole.

    Args:
        q: the decode query, ``[num_qo_heads, head_dim]`` or ``[1, num_qo_heads, head_dim]``.

    Raises:
        InvalidArgumentError: ``budget_tokens`` 0; a cache with ``track_key_bounds=False``
            or ``key_rope="pre"``.
        OutOfRangeError: ``layer`` out of range. UnknownSequenceError, ShapeError: as usual.
    """

def top_k(scores: FloatArray, k: int) -> npt.NDArray[np.uint32]:
    """Indices of the ``k`` largest of a 1-D array of scores, in ascending index order.

    Ties go to the lower index; NaN counts as ``-inf``; a ``k`` of at least ``len(scores)``
    returns every index.

    Raises:
        ShapeError: ``scores`` not 1-D. DTypeError: not float32, float16 or float64.
    """

def expand_spans(
    hits: IntArray, span: int, budget: int, seq_len: int, read_anyway: IntArray | None = None
) -> npt.NDArray[np.uint32]:
    """Spans (ReAttention): grow ranked hit tokens into spans of their neighbours, up to a
    budget, as the ``span=`` policy item does; returns the tokens taken, ascending (uint32).

    The span of hit ``t`` is ``t - (span - 1) // 2 ..= t + span // 2`` inside
    ``0..seq_len``. Hits are taken in order (best first); each adds the tokens of its span
    that are neither taken yet nor in ``read_anyway`` (strictly ascending: the sinks and
    window read in any case, which do not count), nearest to the hit first (a tie: the
    earlier token), until ``budget`` tokens are taken. Hits at or past ``seq_len`` are
    ignored.

    Raises:
        InvalidArgumentError: ``span`` 0, or ``read_anyway`` not strictly ascending.
        OutOfRangeError: a negative count or an index outside uint32.
    """

def window_pages_to_evict(seq_len: int, page_size: int, sinks: int, window: int) -> npt.NDArray[np.int64]:
    """Pages of a sequence (ascending indices into its page list) whose tokens all lie
    outside the first ``sinks`` and the last ``window`` tokens, so a sinks + window
    selection never reads them again (pass them to :meth:`KvCache.evict_pages`). The page
    of the last token is never listed.

    Raises:
        InvalidArgumentError: ``page_size`` 0 or ``window`` 0.
    """

def gemfilter_scores(
    q: FloatArray,
    keys: FloatArray | None = None,
    *,
    cache: KvCache | None = None,
    seq: int | None = None,
    layer: int | None = None,
) -> npt.NDArray[np.float32]:
    """GemFilter's unpooled token scores: for every token ``t``, the sum over query heads
    ``h`` of ``q[h] · keys[t, h // group]`` (unscaled logits, before softmax; ``group =
    num_qo_heads // num_kv_heads``).

    The keys come from exactly one source: ``keys``, an array ``[n, num_kv_heads,
    head_dim]`` (after RoPE; float32, float16 or float64, any strides), or ``cache=``,
    ``seq=`` and ``layer=``, the keys of that sequence at that layer in a
    ``key_rope="post"`` cache.

    Args:
        q: the filter layer's last query (after RoPE), ``[num_qo_heads, head_dim]`` or
            ``[1, num_qo_heads, head_dim]``.

    Returns:
        float32 ``[n]``.

    Raises:
        InvalidArgumentError: both key sources or neither (the message names ``keys`` and
            the cache arguments), ``cache=`` without ``seq=`` or ``layer=``, or a cache with
            ``key_rope="pre"`` (``cache`` named).
        ShapeError: ``keys`` not ``[n, num_kv_heads >= 1, head_dim]``; ``q`` not
            ``[num_qo_heads, head_dim]`` with the keys' head_dim and a positive multiple of
            their ``num_kv_heads`` as its number of heads.
        UnsupportedError: a ``keys`` head_dim that is not a multiple of 8 from 8 to
            :data:`MAX_HEAD_DIM`.
        DTypeError: ``q`` or ``keys`` not float32 / float16 / float64, ``cache`` not a :class:`KvCache`.
        UnknownSequenceError, OutOfRangeError: a bad ``seq`` or ``layer``.
    """

def avg_pool(scores: FloatArray, kernel: int) -> npt.NDArray[np.float32]:
    """Centred 1-D average pool: entry ``i`` becomes the mean of the entries ``i - r ..= i +
    r`` (``r = kernel // 2``) that exist, so entries near the ends average fewer values.

    Args:
        scores: 1-D, float32, float16 or float64.
        kernel: the window width, odd; 1 returns the scores unchanged (as float32).

    Returns:
        float32, like ``scores``.

    Raises:
        InvalidArgumentError: an even ``kernel`` (0 included).
        OutOfRangeError: a negative ``kernel``.
        ShapeError: ``scores`` not 1-D.
    """

def gemfilter_select(
    q: FloatArray,
    keys: FloatArray | None = None,
    *,
    cache: KvCache | None = None,
    seq: int | None = None,
    layer: int | None = None,
    k: int,
    pool_kernel: int = 5,
    keep_first: int = 0,
    keep_last: int = 0,
) -> npt.NDArray[np.uint32]:
    """GemFilter: the ``k`` prompt tokens a filter layer's last query points at.

    Tokens are ranked by :func:`avg_pool` (width ``pool_kernel``) of
    :func:`gemfilter_scores`; the first ``keep_first`` and last ``keep_last`` tokens are
    always kept and count towards ``k``; equal scores go to the lower index. An engine
    runs the first layers on the whole prompt, calls this with the filter layer's last
    query, then prefills only the returned tokens (with fresh positions) and answers from
    them.

    Args:
        q, keys, cache, seq, layer: as in :func:`gemfilter_scores`.
        k: tokens to keep in all, ``1 ..= n``.
        pool_kernel: width of the average pool, odd (1 = no pooling).
        keep_first: always keep this many first tokens (attention sinks).
        keep_last: always keep this many last tokens (the question).

    Returns:
        uint32 ``[k]``, ascending token indices.

    Raises:
        OutOfRangeError: ``k`` not in ``1 ..= n`` (``k`` named); a negative count.
        InvalidArgumentError: ``keep_first + keep_last > k`` (``k`` named, with
            ``keep_first + keep_last``); an even ``pool_kernel``; an empty context (``keys``
            or ``seq`` named); and as :func:`gemfilter_scores`.
        ShapeError, DTypeError, UnsupportedError, UnknownSequenceError: as
            :func:`gemfilter_scores`.
    """

def snapkv(
    q_window: FloatArray,
    keys: FloatArray | None = None,
    *,
    cache: KvCache | None = None,
    seq: int | None = None,
    layer: int | None = None,
    k: int,
    pool_kernel: int = 7,
    scale: float | None = None,
) -> tuple[Selection, npt.NDArray[np.uint32]]:
    """SnapKV: per KV head, the prompt tokens the observation window attends to most.

    ``q_window`` holds the queries (after RoPE) of the prompt's last ``w`` tokens. Each
    window query attends causally to the keys (softmax per query head, logits ``scale * q ·
    k``); the probabilities it gives the prefix (the ``n - w`` tokens before the window) are
    summed over the window and over the query heads of each KV head, pooled with
    :func:`avg_pool` (width ``pool_kernel``), and the best ``k - w`` prefix tokens of each KV
    head are kept (ties to the lower index), plus the whole window.

    Args:
        q_window: ``[w, num_qo_heads, head_dim]``, ``1 <= w <= n``.
        keys, cache, seq, layer: as in :func:`gemfilter_scores`.
        k: tokens kept per KV head, window included, ``w ..= n``.
        pool_kernel: width of the average pool over the votes, odd.
        scale: multiplier of ``q · k`` before softmax (default ``1 / sqrt(head_dim)``).

    Returns:
        ``(selection, union)``: the :class:`Selection` of ``k`` tokens per KV head (for
        :meth:`KvCache.compact` with ``per="head"`` or sparse attention), and the union of
        the heads' tokens, uint32 ascending (for prefilling once).

    Raises:
        OutOfRangeError: ``k`` not in ``w ..= n`` (``k`` named); ``w > n`` (``q_window``).
        ShapeError: ``q_window`` not ``[w >= 1, num_qo_heads, head_dim]`` with the keys'
            head_dim and a positive multiple of their ``num_kv_heads``.
        InvalidArgumentError: an even ``pool_kernel``; a non-finite ``scale``; and as
            :func:`gemfilter_scores`.
    """

def calibrate_filter_layer(
    queries: Sequence[FloatArray],
    keys: Sequence[FloatArray],
    needle_start: int,
    needle_end: int,
    *,
    k: int,
    pool_kernel: int = 5,
    keep_first: int = 0,
    keep_last: int = 0,
) -> npt.NDArray[np.float64]:
    """Choose GemFilter's filter layer: for each layer, the share of a known needle (tokens
    ``needle_start .. needle_end`` of the prompt) that :func:`gemfilter_select` keeps from
    that layer's last query and keys. The best filter layer is the earliest with high
    recall.

    Args:
        queries: per layer, the last query ``[num_qo_heads, head_dim]`` (or
            ``[1, num_qo_heads, head_dim]``).
        keys: per layer, the prompt's keys ``[n, num_kv_heads, head_dim]`` (same number of
            layers as ``queries``).
        needle_start, needle_end: the needle's token range, non-empty, inside every layer's
            keys.
        k, pool_kernel, keep_first, keep_last: as in :func:`gemfilter_select`.

    Returns:
        float64 ``[num_layers]``: recall of the needle per layer, in ``[0, 1]``.

    Raises:
        InvalidArgumentError: no layers; ``needle_end <= needle_start``.
        OutOfRangeError: ``needle_end`` past a layer's keys; ``k`` as in
            :func:`gemfilter_select`.
        ShapeError: ``keys`` not as long as ``queries``; a malformed ``queries[l]`` or
            ``keys[l]`` (named with its index).
    """

def kmeans(
    keys: FloatArray,
    clusters: int | float | None = None,
    *,
    init: FloatArray | None = None,
    max_iter: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """K-means over one head's keys ``[n, head_dim]``, as :meth:`ClusterIndex.build` runs
    per KV head: keys compared by cosine (scaled to unit length), k-means++ seeds drawn
    from ``seed`` (or the given centroids ``init``, ``[k, head_dim]``, scaled to unit
    length), then up to ``max_iter`` Lloyd iterations with empty clusters repaired;
    assignment ties go to the lower cluster.

    Args:
        keys: ``[n, head_dim]``, float32, float16 or float64.
        clusters: an int, or a float fraction of ``n`` in ``(0, 1]``; exactly one of
            ``clusters`` and ``init``.
        init: initial centroids ``[k, head_dim]`` (``1 <= k <= n``).

    Returns:
        A dict: ``centroids`` (raw-key means, float32 ``[k, head_dim]``),
        ``centroids_normalized``, ``sizes`` (uint32 ``[k]``), ``member_offsets`` (uint32
        ``[k + 1]``), ``members`` (uint32 ``[n]``, ascending per cluster), ``assignment``
        (uint32 ``[n]``), ``inertia``, ``inertia_history``, ``iterations``, ``converged``
        and ``seeds`` (uint32; empty with ``init``), as in :meth:`ClusterIndex.diagnostics`.

    Raises:
        InvalidArgumentError: neither or both of ``clusters`` and ``init``; a bad count
            (as :meth:`ClusterIndex.build`; with ``init``, more rows than keys); a NaN or
            infinite key or initial centroid.
        ShapeError: ``keys`` or ``init`` not 2-D, or ``init`` with another head_dim.
        UnsupportedError: a head_dim that is not a multiple of 8 from 8 to :data:`MAX_HEAD_DIM`.
        OutOfRangeError: a negative count, ``max_iter`` or ``seed``.
    """

def kmeans_seeds(keys: FloatArray, k: int, seed: int = 0) -> npt.NDArray[np.uint32]:
    """The ``k`` k-means++ seeds (key indices, in the order drawn) that :func:`kmeans`
    starts from with the same ``seed``; errors as :func:`kmeans` (``k`` named)."""

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
    """The SIMD instruction set the CPU kernels use on this machine (``"avx512f+avx2+fma+f16c"``,
    ``"avx2+fma+f16c"`` or ``"portable"``; the environment variable ``KVSIEVE_ISA=avx2`` or
    ``portable``, read once per process, lowers it)."""

# ---- CUDA (device arrays through ``__dlpack__``) --------------------------------------
#
# Device arrays are any objects with ``__dlpack__`` (torch, cupy, jax) in CUDA memory.
# Results are written in place into the output arrays, on ``stream`` (a ``cudaStream_t`` as
# an int, e.g. ``torch.cuda.current_stream().cuda_stream``; None is the legacy default
# stream), and the call returns without waiting. Kernel limits: pages float16 or bfloat16,
# head_dim 64 or 128, page_size a power of two, K/V strides multiples of 8 elements.
# A wheel built without the ``cuda`` feature, or a machine without a driver, raises
# CudaUnavailableError.

def cuda_device_count() -> int:
    """Number of CUDA devices (raises :class:`CudaUnavailableError` without a driver or CUDA support)."""

def cuda_paged_decode(
    k_pages: Any,
    v_pages: Any,
    indptr: Any,
    indices: Any,
    last_page_len: Any,
    q: Any,
    out: Any,
    *,
    max_seq_len: int,
    lse: Any | None = None,
    layout: str = "nhd",
    positions: Any | None = None,
    key_rope: str = "post",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    rope: RopeConfig | None = None,
    position_mode: str = "original",
    max_distance: int | None = None,
    chunk_size: int | None = None,
    sel_indptr: Any | None = None,
    sel_indices: Any | None = None,
    max_per_head: int | None = None,
    stream: int | None = None,
) -> None:
    """Decode on the GPU over engine-owned device pages, as :func:`paged_decode`.

    ``k_pages``/``v_pages`` are ``[num_pages, page_size, num_kv_heads, head_dim]`` (``"nhd"``)
    or ``[num_pages, num_kv_heads, page_size, head_dim]`` (``"hnd"``); ``indptr``,
    ``indices``, ``last_page_len`` and ``positions`` int32 device arrays; ``q`` and ``out``
    ``[batch, num_qo_heads, head_dim]``; ``lse`` a float32 ``[batch, num_qo_heads]`` device
    array. ``max_seq_len`` bounds every sequence's length. With ``sel_indptr`` (int32,
    ``batch * num_kv_heads + 1``) and ``sel_indices`` (int32) KV head ``h`` of sequence ``b``
    reads only list ``b * num_kv_heads + h`` (strictly ascending tokens, at most
    ``max_per_head``): sparse decode.
    """

def cuda_paged_append(
    k_pages: Any,
    v_pages: Any,
    k: Any,
    v: Any,
    slot_mapping: Any,
    *,
    layout: str = "nhd",
    stream: int | None = None,
) -> None:
    """Write row ``i`` of ``k``/``v`` (``[n, num_kv_heads, head_dim]``) into slot
    ``slot_mapping[i]`` (int64, ``page * page_size + slot``; negative = skip) of the device
    pages, converted to their dtype."""

def cuda_merge_states(
    v_a: Any,
    lse_a: Any,
    v_b: Any,
    lse_b: Any,
    out: Any,
    lse_out: Any,
    *,
    stream: int | None = None,
) -> None:
    """:func:`merge_states` on device arrays: ``out`` and ``lse_out`` (float32
    ``[n, heads]``) are written in place."""

def cuda_update_key_bounds(
    k_pages: Any,
    v_pages: Any,
    key_bounds: Any,
    entries: Any,
    *,
    layout: str = "nhd",
    stream: int | None = None,
) -> None:
    """Keep page key bounds (Quest) in a device array ``key_bounds``
    (``[num_pages, num_kv_heads, 2, head_dim]`` of the page dtype: minima, then maxima).

    ``entries`` is a contiguous int32 device array ``[n, 4]``: per row a page, a reset flag
    (non-zero: start from empty bounds, for a page reused by a new sequence) and the 64-bit
    mask of the slots to fold in (low 32 bits, then high 32 bits; page_size at most 64).
    Pages must be distinct. Run after :func:`cuda_paged_append` on the same stream.
    Graph-capturable.
    """

def cuda_page_bounds(
    k_pages: Any,
    v_pages: Any,
    indptr: Any,
    indices: Any,
    last_page_len: Any,
    key_bounds: Any,
    q: Any,
    sel_indptr: Any,
    sel_indices: Any,
    *,
    max_seq_len: int,
    budget_tokens: int,
    min_pages: int = 0,
    layout: str = "nhd",
    stream: int | None = None,
) -> None:
    """Page-bound (Quest) selection on the GPU for every sequence of the page table, as
    :func:`page_bounds`: pages ranked per KV head by an upper bound of the
    query's logits (``key_bounds`` from :func:`cuda_update_key_bounds`), whole pages kept
    best first to ``budget_tokens`` (at least ``min_pages``).

    ``q`` is ``[batch, num_qo_heads, head_dim]`` on the device (keys after RoPE). Writes the
    device CSR :func:`cuda_paged_decode` reads as ``sel_indptr``/``sel_indices``: int32
    ``sel_indptr`` of ``batch * num_kv_heads + 1`` and ``sel_indices`` with room for
    ``batch * num_kv_heads * max_seq_len`` (pass ``max_per_head=max_seq_len`` to decode).
    The first call of a shape allocates scratch; later ones can be captured in a CUDA graph.
    """

def cuda_paged_prefill(
    k_pages: Any,
    v_pages: Any,
    indptr: Any,
    indices: Any,
    last_page_len: Any,
    q: Any,
    qo_indptr: Sequence[int] | IntArray,
    out: Any,
    *,
    causal: bool = True,
    windows: Sequence[tuple[int, int] | None] | None = None,
    sel_indptr: Any | None = None,
    sel_indices: Any | None = None,
    max_per_head: int | None = None,
    lse: Any | None = None,
    layout: str = "nhd",
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    stream: int | None = None,
) -> None:
    """Prefill attention on the GPU (tensor cores) over device pages, as
    :func:`paged_prefill_sparse`.

    Pages float16 or bfloat16 with keys after RoPE, head_dim 64 or 128; ``q`` and ``out``
    ``[total, num_qo_heads, head_dim]`` in the page dtype, contiguous; ``qo_indptr`` a host
    sequence of ``batch + 1`` ints (rows of ``q`` per sequence: its last tokens);
    ``windows`` one ``(sinks, window)`` pair or None per KV head (StreamingLLM / the
    Λ-mask); ``sel_indptr``/``sel_indices`` optional device token lists per (sequence, KV
    head) with ``max_per_head``; ``lse`` a float32 ``[total, num_qo_heads]`` device array.
    Not graph-capturable (``qo_indptr`` and ``windows`` are copied to the device).
    """

def cuda_gemfilter_select(
    q: Any,
    keys: Any,
    indices: Any,
    *,
    k: int,
    pool_kernel: int = 5,
    keep_first: int = 0,
    keep_last: int = 0,
    stream: int | None = None,
) -> None:
    """GemFilter on the GPU, as :func:`gemfilter_select`: the ``k`` tokens the filter
    layer's last query ``q`` (``[num_qo_heads, head_dim]``) points at among ``keys``
    (``[n, num_kv_heads, head_dim]``, after RoPE), ascending, written to the int32 device
    array ``indices`` (at least ``k`` values)."""

class CudaClusterIndex:
    """A K-means index resident on one CUDA device, for centroid retrieval on the GPU.

    Made by :meth:`upload` (from a host :class:`ClusterIndex`) or :meth:`build` (K-means on
    the device). Retrieval reuses the index's device scratch: order calls on one index on
    one stream.
    """

    @staticmethod
    def upload(index: ClusterIndex, *, device: int = 0, stream: int | None = None) -> CudaClusterIndex:
        """Copy ``index`` to CUDA device ``device`` (waits for the copy). Upload again after
        :meth:`ClusterIndex.assign_new` or a rebuild."""

    @staticmethod
    def build(
        keys: Any,
        *,
        clusters: int | float,
        max_iter: int = 20,
        seed: int = 0,
        exclude_window: int = 0,
        coarse: int | float | None = None,
        stream: int | None = None,
    ) -> tuple[ClusterIndex, CudaClusterIndex]:
        """Cluster device keys ``[n, num_kv_heads, head_dim]`` on their GPU, as
        :meth:`ClusterIndex.build` (k-means++, Lloyd iterations, empty clusters repaired;
        the coarse level on the host). Returns the index on the host and on the device."""

    @property
    def num_kv_heads(self) -> int:
        """KV heads the index covers."""
    @property
    def head_dim(self) -> int:
        """Channels per key."""
    @property
    def num_clusters(self) -> int:
        """Clusters per KV head."""
    @property
    def num_coarse_clusters(self) -> int:
        """Coarse clusters per KV head (0 without a coarse level)."""
    @property
    def clustered_len(self) -> int:
        """Tokens clustered per KV head: ``sel_indices`` needs ``num_kv_heads * clustered_len``."""

    def retrieve(
        self,
        q: Any,
        sel_indptr: Any,
        sel_indices: Any,
        *,
        threshold: float | Sequence[float] | ClusterThresholds | None = None,
        budget: int | None = None,
        hierarchical: bool = False,
        coarse_threshold: float | None = None,
        coarse_budget: int | None = None,
        coarse_budget_multiple: float | None = None,
        rank: str = "estimate",
        stream: int | None = None,
    ) -> None:
        """Centroid retrieval on the GPU for the decode query ``q``
        (``[num_qo_heads, head_dim]`` on the device, after RoPE), with the rules of
        :meth:`ClusterIndex.retrieve`, written as a device CSR over KV heads: int32
        ``sel_indptr`` (``num_kv_heads + 1``) and ``sel_indices`` (room for
        ``num_kv_heads * clustered_len``), ascending clustered tokens. After the first call,
        retrieval queues kernels only (a changed threshold is copied first).
        ``rank="mixed"`` works for any build; an index loaded from a version 1 file has no
        radii (InvalidArgumentError)."""

class CudaKvCache:
    """Paged K/V owned by kvsieve and resident on a CUDA device, with the bookkeeping of
    :class:`KvCache` (sequences, fork with copy on write, append, write, truncate, page
    eviction, compaction, exact key bounds) and the same answers.

    Pages are float16 or bfloat16 (``dtype``), ``page_size`` a power of two (at most 64
    with ``track_key_bounds``). Every change returns when its device work is done. Raises
    :class:`CudaUnavailableError` without a driver, a device or a wheel built with CUDA.
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
        *,
        device: int = 0,
    ) -> None: ...
    def create_sequence(self) -> int:
        """A new empty sequence; returns its id."""
    def fork(self, seq: int) -> int:
        """Fork ``seq`` (prefix sharing, copy on write); returns the new id."""
    def free_sequence(self, seq: int) -> None:
        """Drop ``seq``; pages no other sequence shares go back to the pool."""
    def seq_len(self, seq: int) -> int:
        """Tokens held by ``seq``."""
    def append(self, seq: int, n: int, positions: IntArray | Sequence[int] | None = None) -> npt.NDArray[np.int64]:
        """Reserve ``n`` slots at the end of ``seq``; returns their slot numbers
        (``page * page_size + slot``)."""
    def write(self, seq: int, layer: int, start: int, k: Any, v: Any) -> None:
        """Write K and V of tokens ``start .. start + n`` of ``layer``, ``[n, num_kv_heads,
        head_dim]``: numpy arrays (converted to float32 on the host) or ``__dlpack__`` device
        arrays on the cache's device (float32, float16 or bfloat16)."""
    def truncate(self, seq: int, new_len: int) -> None:
        """Keep the first ``new_len`` tokens of ``seq``."""
    def evict_pages(self, seq: int, page_indices: IntArray | Sequence[int]) -> None:
        """Evict whole pages (indices into the sequence's page list, strictly increasing)."""
    def compact(self, seq: int, keep: Any, per: str = "all") -> None:
        """Keep only the tokens ``keep`` of ``seq`` in fresh pages, as :meth:`KvCache.compact`."""
    def decode(
        self,
        layer: int,
        seqs: Sequence[int] | IntArray,
        q: Any,
        out: Any,
        *,
        lse: Any | None = None,
        sel_indptr: Any | None = None,
        sel_indices: Any | None = None,
        max_per_head: int | None = None,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
        stream: int | None = None,
    ) -> None:
        """Decode ``layer`` for the sequences ``seqs`` on the GPU: ``q`` and ``out``
        ``[len(seqs), num_qo_heads, head_dim]`` device arrays, ``lse`` an optional float32
        ``[len(seqs), num_qo_heads]`` device array; with ``sel_indptr``/``sel_indices``
        (int32 device CSR over (sequence, KV head), lists at most ``max_per_head`` long),
        sparse decode. Waits for the decode."""
