"""Bad input from Python becomes a KvsieveError with the right code and a message naming the
parameter; nothing panics, and a failed call changes nothing."""

import contextlib

import numpy as np
import pytest

import kvsieve
from kvsieve import ErrorCode

H, D, PS = 2, 32, 4


@contextlib.contextmanager
def raises(cls, code, *words):
    """Expect `cls` with `code`, its message containing every word."""
    with pytest.raises(cls) as info:
        yield info
    err = info.value
    assert isinstance(err, kvsieve.KvsieveError)
    assert err.code == code and err.code_name == code.name.lower()
    for w in words:
        assert w in str(err), f"{w!r} not in {str(err)!r}"


@pytest.fixture
def cache(rng):
    c = kvsieve.KvCache(2, H, D, PS, 8, dtype="f32")
    s = c.create_sequence()
    c.append(s, 6)
    kv = rng.standard_normal((6, H, D)).astype(np.float32)
    c.write(s, 0, 0, kv, kv)
    c.write(s, 1, 0, kv, kv)
    return c, s


def kv(n, h=H, d=D, dtype=np.float32):
    return np.ones((n, h, d), dtype)


def test_exception_classes():
    assert issubclass(kvsieve.KvsieveError, Exception)
    pairs = {
        kvsieve.InvalidArgumentError: ErrorCode.INVALID_ARGUMENT,
        kvsieve.ShapeError: ErrorCode.SHAPE,
        kvsieve.DTypeError: ErrorCode.DTYPE,
        kvsieve.NullPointerError: ErrorCode.NULL_POINTER,
        kvsieve.UnknownSequenceError: ErrorCode.UNKNOWN_SEQUENCE,
        kvsieve.OutOfRangeError: ErrorCode.OUT_OF_RANGE,
        kvsieve.OutOfPagesError: ErrorCode.OUT_OF_PAGES,
        kvsieve.UnsupportedError: ErrorCode.UNSUPPORTED,
        kvsieve.CudaUnavailableError: ErrorCode.CUDA_UNAVAILABLE,
        kvsieve.IoError: ErrorCode.IO,
        kvsieve.ParseError: ErrorCode.PARSE,
        kvsieve.InternalError: ErrorCode.INTERNAL,
        kvsieve.OutOfMemoryError: ErrorCode.OUT_OF_MEMORY,
    }
    assert len(pairs) == len(ErrorCode) == 13
    for cls, code in pairs.items():
        assert issubclass(cls, kvsieve.KvsieveError)
        assert cls.code is code and cls.code_name == code.name.lower()
        assert cls.__module__ == "kvsieve"
    # Kinds with a built-in counterpart derive from it too.
    builtin = {
        kvsieve.InvalidArgumentError: ValueError,
        kvsieve.ShapeError: ValueError,
        kvsieve.DTypeError: TypeError,
        kvsieve.UnknownSequenceError: KeyError,
        kvsieve.OutOfRangeError: IndexError,
        kvsieve.OutOfPagesError: MemoryError,
        kvsieve.OutOfMemoryError: MemoryError,
    }
    for cls in pairs:
        assert cls.__bases__ == (kvsieve.KvsieveError,) + ((builtin[cls],) if cls in builtin else ()), cls
    assert kvsieve.KvsieveError.__bases__ == (Exception,)
    # Stable values, shared with the C ABI.
    assert [int(c) for c in ErrorCode] == list(range(1, 14))
    assert ErrorCode.SHAPE == 2 and ErrorCode.OUT_OF_PAGES == 7


def test_config_errors():
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "page_size"):
        kvsieve.KvCache(1, 1, 64, 0, 4)
    with raises(kvsieve.UnsupportedError, ErrorCode.UNSUPPORTED, "head_dim 12"):
        kvsieve.KvCache(1, 1, 12, 16, 4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "num_layers"):
        kvsieve.KvCache(0, 1, 64, 16, 4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "capacity_pages"):
        kvsieve.KvCache(1, 1, 64, 16, 0)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "num_kv_heads"):
        kvsieve.KvCache(1, -2, 64, 16, 4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "dtype", "f64"):
        kvsieve.KvCache(1, 1, 64, 16, 4, dtype="f64")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "layout"):
        kvsieve.KvCache(1, 1, 64, 16, 4, layout="ndh")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "key_rope"):
        kvsieve.KvCache(1, 1, 64, 16, 4, key_rope="maybe")


def test_unknown_sequences_and_indices(cache):
    c, s = cache
    for call in (
        lambda: c.seq_len(99),
        lambda: c.fork(99),
        lambda: c.free_sequence(99),
        lambda: c.append(99, 1),
        lambda: c.positions(99),
        lambda: c.read_keys(99, 0),
        lambda: c.page_table([s, 99]),
        lambda: c.decode(0, [99], kv(1)),
        lambda: c.write(99, 0, 0, kv(1), kv(1)),
    ):
        with raises(kvsieve.UnknownSequenceError, ErrorCode.UNKNOWN_SEQUENCE, "99"):
            call()
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "seq", "-1"):
        c.seq_len(-1)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "seqs[1]"):
        c.page_table([s, -3])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer", "0..2"):
        c.decode(2, [s], kv(1))
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        c.read_values(s, 5)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        c.write(s, -1, 0, kv(1), kv(1))
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "start"):
        c.write(s, 0, 4, kv(3), kv(3))
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "new_len"):
        c.truncate(s, 7)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "page_indices[0]"):
        c.evict_pages(s, [2])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "page_indices"):
        c.evict_pages(s, [1, 0])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "page_index"):
        c.page_key_bounds(s, 0, 2)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "page"):
        c.page_refcount(8)
    other = c.create_sequence()
    foreign = c.append(other, 1)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "slots[1]"):
        c.write_slots(s, 0, [0, int(foreign[0])], kv(2), kv(2))
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "positions[1]"):
        c.append(s, 2, positions=[0, 2**31])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "positions"):
        c.append(s, 2, positions=[0, 1, 2])
    c.check_invariants()
    assert c.seq_len(s) == 6


def test_array_shapes_and_dtypes(cache):
    c, s = cache
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`k`", f"[2, {H}, {D}]", f"[2, {H}, {D + 8}]"):
        c.write(s, 0, 0, kv(2, d=D + 8), kv(2))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`v`"):
        c.write(s, 0, 0, kv(2), kv(3))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`k`"):
        c.write(s, 0, 0, np.ones((2, H * D), np.float32), kv(2))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`k`", "int16"):
        c.write(s, 0, 0, kv(2, dtype=np.int16), kv(2))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`v`", "int32"):
        c.write(s, 0, 0, kv(2), kv(2, dtype=np.int32))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`k`", "list"):
        c.write(s, 0, 0, kv(2).tolist(), kv(2))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`slots`", "float64"):
        c.write_slots(s, 0, np.array([0.0, 1.0]), kv(2), kv(2))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`slots`"):
        c.write_slots(s, 0, np.zeros((1, 2), np.int64), kv(2), kv(2))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`seqs`"):
        c.decode(0, "abc", kv(1))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`", "num_qo_heads"):
        c.decode(0, [s], np.ones((1, 3, D), np.float32))  # 3 query heads over 2 KV heads
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`"):
        c.decode(0, [s], np.ones((1, 2, D + 8), np.float32))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`"):
        c.decode(0, [s], np.ones((2, D), np.float32))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`"):
        c.decode(0, [s], np.ones((), np.float32))
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`", "batch"):
        c.decode(0, [s, s], kv(1))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`q`", "complex64", "float32, float16 or float64"):
        c.decode(0, [s], kv(1, dtype=np.complex64))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "qo_indptr"):
        c.prefill(0, [s], kv(7), [0, 7])  # more queries than tokens
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "qo_indptr"):
        c.prefill(0, [s], kv(2), [0, 1, 2])
    with raises(kvsieve.UnsupportedError, ErrorCode.UNSUPPORTED, "out_dtype"):
        c.decode(0, [s], kv(1), out_dtype="bf16")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "out_dtype"):
        c.decode(0, [s], kv(1), out_dtype="int8")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "chunk_size"):
        c.decode(0, [s], kv(1), chunk_size=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "chunk_size"):
        c.decode(0, [s], kv(1), chunk_size=-4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "logit_soft_cap"):
        c.decode(0, [s], kv(1), logit_soft_cap=-1.0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "scale"):
        c.decode(0, [s], kv(1), scale=float("nan"))


def test_pre_rope_cache_needs_rope(rng):
    c = kvsieve.KvCache(1, 1, 32, 4, 4, key_rope="pre")
    s = c.create_sequence()
    c.append(s, 3)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "rope"):
        c.decode(0, [s], np.ones((1, 1, 32), np.float32))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "rope.rotary_dim"):
        c.decode(0, [s], np.ones((1, 1, 32), np.float32), rope=kvsieve.RopeConfig(1e4, rotary_dim=48))


def test_capacity_exhausted_leaves_sequence_unchanged(rng):
    c = kvsieve.KvCache(1, H, D, PS, 3, dtype="f16")
    a = c.create_sequence()
    c.append(a, 6)  # 2 pages
    k = rng.standard_normal((6, H, D)).astype(np.float32)
    c.write(a, 0, 0, k, k)
    before = (c.seq_len(a), c.positions(a).copy(), c.seq_pages(a).copy(), c.stats(), c.read_keys(a, 0))
    with raises(kvsieve.OutOfPagesError, ErrorCode.OUT_OF_PAGES, "needs 2", "has 1"):
        c.append(a, 7)  # 2 slots left in the last page, then 2 new pages; only 1 free
    after = (c.seq_len(a), c.positions(a), c.seq_pages(a), c.stats(), c.read_keys(a, 0))
    assert before[0] == after[0] and before[3] == after[3]
    for x, y in zip(before[1:3] + before[4:], after[1:3] + after[4:]):
        np.testing.assert_array_equal(x, y)
    # A fork shares every page; b's append copies the shared last page into the free one.
    b = c.fork(a)
    c.append(b, 2)
    # Cutting a's first page (still shared with b) in the middle needs a copy: no page left.
    with raises(kvsieve.OutOfPagesError, ErrorCode.OUT_OF_PAGES):
        c.truncate(a, 1)
    assert c.seq_len(a) == 6 and c.seq_len(b) == 8
    np.testing.assert_array_equal(c.read_keys(a, 0), before[4])
    c.check_invariants()


def test_engine_memory_errors(rng):
    k = rng.standard_normal((4, 8, 2, 32)).astype(np.float32)
    v = rng.standard_normal((4, 8, 2, 32)).astype(np.float32)
    q = rng.standard_normal((1, 2, 32)).astype(np.float32)
    ok = ([0, 2], [0, 3], [5])
    kvsieve.paged_decode(k, v, *ok, q)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "indices[1]", "4"):
        kvsieve.paged_decode(k, v, [0, 2], [0, 4], [5], q)  # a table pointing past the memory
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "indices[0]"):
        kvsieve.paged_decode(k, v, [0, 1], [-1], [5], q)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "last_page_len"):
        kvsieve.paged_decode(k, v, [0, 2], [0, 3], [9], q)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "indptr"):
        kvsieve.paged_decode(k, v, [0, 2, 2], [0, 3], [5], q)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "indptr"):
        kvsieve.paged_decode(k, v, [1, 2], [0, 3], [5], q)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "indices"):
        kvsieve.paged_decode(k, v, [0, 2], [0, 3, 1], [5], q)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "k_pages", "num_pages"):
        kvsieve.paged_decode(k[0], v[0], *ok, q)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "v_pages"):
        kvsieve.paged_decode(k, v[:3], *ok, q)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "v_pages"):
        kvsieve.paged_decode(k, v.astype(np.float16), *ok, q)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "k_pages", "int32"):
        kvsieve.paged_decode(k.astype(np.int32), v, *ok, q)
    wide = rng.standard_normal((4, 8, 2, 64)).astype(np.float32)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "k_pages", "innermost"):
        kvsieve.paged_decode(wide[..., ::2], wide[..., 1::2], *ok, q)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "k_pages", "non-negative"):
        kvsieve.paged_decode(k[::-1], v, *ok, q)  # engine pages are never copied
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "page_size"):
        kvsieve.paged_decode(k[:, :0], v[:, :0], [0, 0], [], [0], q)
    with raises(kvsieve.UnsupportedError, ErrorCode.UNSUPPORTED, "head_dim 20"):
        kvsieve.paged_decode(k[..., :20], v[..., :20], *ok, q[..., :20])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "positions"):
        kvsieve.paged_decode(k, v, *ok, q, positions=np.arange(31, dtype=np.int32))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "layout"):
        kvsieve.paged_decode(k, v, *ok, q, layout="nchw")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "rope"):
        kvsieve.paged_decode(k, v, *ok, q, key_rope="pre")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "qo_indptr"):
        kvsieve.paged_prefill(k, v, *ok, q, [0, 2])
    unaligned = np.frombuffer(np.zeros(4 * 8 * 2 * 32 * 2 + 1, np.uint8).tobytes(), np.float16, offset=1, count=4 * 8 * 2 * 32)
    unaligned = unaligned.reshape(4, 8, 2, 32)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "aligned"):
        kvsieve.paged_decode(unaligned, unaligned, *ok, q)


def test_op_errors(rng):
    v = rng.standard_normal((2, 3, 8)).astype(np.float32)
    lse = np.zeros((2, 3), np.float32)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "v_b"):
        kvsieve.merge_states(v, lse, v[:1], lse)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "lse_b"):
        kvsieve.merge_states(v, lse, v, lse[:1])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "v_a"):
        kvsieve.merge_states(v[0], lse, v, lse)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "lse_a", "int64"):
        kvsieve.merge_states(v, lse.astype(np.int64), v, lse)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "positions"):
        kvsieve.apply_rope(x, [1, 2, 3], 1e4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "theta"):
        kvsieve.apply_rope(x, [1, 2], 0.5)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "rotary_dim"):
        kvsieve.apply_rope(x, [1, 2], 1e4, rotary_dim=7)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "style"):
        kvsieve.apply_rope(x, [1, 2], 1e4, style="neox")
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`x`", "int32"):
        kvsieve.apply_rope(x.astype(np.int32), [1, 2], 1e4)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`x`", "float64", "written in place"):
        kvsieve.apply_rope(x.astype(np.float64), [1, 2], 1e4, inplace=True)
    frozen = x.copy()
    frozen.flags.writeable = False
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`x`", "writable"):
        kvsieve.apply_rope(frozen, [1, 2], 1e4, inplace=True)
    kvsieve.apply_rope(frozen, [1, 2], 1e4)  # a copy is fine
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`x`"):
        kvsieve.apply_rope(x[::-1], [1, 2], 1e4, inplace=True)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "position_scale"):
        kvsieve.RopeConfig(1e4, position_scale=0.0)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "rotary_dim"):
        kvsieve.RopeConfig(1e4, rotary_dim=-2)


def test_odd_arrays_never_panic(cache):
    """Zero-size, zero-stride and 0-d inputs either work or raise KvsieveError."""
    c, s = cache
    c.write(s, 0, 6, kv(0), kv(0))
    c.write(s, 0, 0, np.broadcast_to(np.float32(0.5), (6, H, D)), kv(6))
    np.testing.assert_array_equal(c.read_keys(s, 0), 0.5)
    out, lse = c.decode(0, [s], np.broadcast_to(np.float32(1.0), (1, 4, D)))
    assert out.shape == (1, 4, D)
    for bad in (np.float32(1.0), np.zeros((0,), np.float32), np.zeros((0, 0, 0), np.float32)):
        with pytest.raises(kvsieve.KvsieveError):
            c.decode(0, [s], bad)
    with pytest.raises(kvsieve.KvsieveError):
        kvsieve.paged_decode(np.zeros((0, 0, 0, 0), np.float32), np.zeros((0, 0, 0, 0), np.float32), [0], [], [], np.zeros((0, 1, 0), np.float32))
    out, lse = kvsieve.paged_decode(
        np.zeros((0, 4, 1, 8), np.float32), np.zeros((0, 4, 1, 8), np.float32), [0], [], [], np.zeros((0, 1, 8), np.float32)
    )
    assert out.shape == (0, 1, 8)
    out, lse = kvsieve.merge_states(np.zeros((0, 2, 8), np.float32), np.zeros((0, 2), np.float32), np.zeros((0, 2, 8), np.float32), np.zeros((0, 2), np.float32))
    assert out.shape == (0, 2, 8)
    # A result too large to allocate is an error, not an abort.
    huge = np.broadcast_to(np.float32(1.0), (2**40, H, D))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`q`", "fits in memory"):
        c.decode(0, [s], huge)


def snapshot(c, s):
    """What a failed call must leave unchanged."""
    return (c.seq_len(s), c.positions(s).tolist(), c.seq_pages(s).tolist(), c.stats(), [c.read_keys(s, l).tolist() for l in range(2)])


def test_selection_errors():
    S = kvsieve.Selection
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "indices", "ascending"):
        S.from_csr(10, [0, 3], [1, 0, 2])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "indices[2]", "10"):
        S.from_csr(10, [0, 3], [1, 2, 10])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "indices[0]", "-1"):
        S.from_csr(10, [0, 3], [-1, 2, 3])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "head_indptr"):
        S.from_csr(10, [0], [])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "head_indptr"):
        S.from_csr(10, [0, 2], [1, 2, 3])
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "indices", "float64"):
        S.from_csr(10, [0, 1], np.array([1.0]))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "heads[1][1]", "ascending"):
        S.from_heads(10, [[1, 2], [3, 3]])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "heads[0][1]", "seq_len"):
        S.from_heads(10, [[1, 12]])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "num_kv_heads"):
        S.from_heads(10, [])
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "heads"):
        S.from_heads(10, "abc")
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "tokens[1]"):
        S.same_for_all_heads(2, 5, [0, 5])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "num_kv_heads"):
        S.dense(0, 5)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "num_kv_heads"):
        S.dense(-1, 5)
    sel = S.dense(2, 5)
    for h in (2, -1):
        with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`h`", "0..2"):
            sel.head(h)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "other", "seq_len"):
        sel.union(S.dense(2, 6))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "other", "num_kv_heads"):
        sel.intersection(S.dense(3, 5))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "other", "Selection"):
        sel.union([0, 1])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "window"):
        kvsieve.streaming(2, 10, 4, 0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "local"):
        kvsieve.lambda_mask(2, 10, 4, 0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "num_kv_heads"):
        kvsieve.streaming(0, 10, 4, 4)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "sinks"):
        kvsieve.streaming(1, 10, -4, 4)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "scores"):
        kvsieve.top_k(np.zeros((2, 3), np.float32), 1)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "scores", "int64"):
        kvsieve.top_k(np.zeros(3, np.int64), 1)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`k`"):
        kvsieve.top_k(np.zeros(3, np.float32), -1)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "page_size"):
        kvsieve.window_pages_to_evict(10, 0, 1, 1)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "window"):
        kvsieve.window_pages_to_evict(10, 4, 1, 0)


def test_policy_errors(cache):
    c, s = cache
    before = snapshot(c, s)
    q = np.ones((1, 4, D), np.float32)
    for text, cls, code, words in [
        ("window=0", kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, ["window=0", "N >= 1"]),
        ("pages=0", kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, ["pages=0"]),
        ("sinks=0", kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, ["selects tokens"]),
        ("layers=5:dense", kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, ["layers=5:dense", "0..2"]),
        ("heads=0.7:window=4", kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, ["heads=0.7", "0..2"]),
        ("window=4,positions=capped", kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, ["max_distance"]),
        ("window=4,positions=contiguous;heads=1.1:window=8", kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, ["one position mode", "layer 1"]),
    ]:
        p = kvsieve.Policy(text)
        with raises(cls, code, *words):
            p.validate(2, H)
        with raises(cls, code, *words):
            c.decode_with_policy(1, [s], q, p)
        with raises(cls, code, *words):
            c.evict_for_policy(s, text)
    with raises(kvsieve.ParseError, ErrorCode.PARSE, "byte 7") as info:
        c.decode_with_policy(0, [s], q, "window=x")
    assert info.value.offset == 7
    with raises(kvsieve.ParseError, ErrorCode.PARSE) as info:
        c.evict_for_policy(s, "sinks=4;;")
    assert info.value.offset == 8
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "policy", "int"):
        c.prefill_with_policy(0, [s], q, [0, 1], 5)
    p = kvsieve.Policy("sinks=2,window=2,pages=4")
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer", "0..2"):
        p.select(c, s, 2, q[0])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        c.decode_with_policy(2, [s], q, p)
    with raises(kvsieve.UnknownSequenceError, ErrorCode.UNKNOWN_SEQUENCE, "99"):
        p.select(c, 99, 0, q[0])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`"):
        p.select(c, s, 0, np.ones((2, 4, D), np.float32))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "budget_tokens"):
        kvsieve.page_bounds(c, s, 0, q[0], 0)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "min_pages"):
        kvsieve.page_bounds(c, s, 0, q[0], 4, min_pages=-1)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        kvsieve.page_bounds(c, s, 7, q[0], 4)
    pre = kvsieve.KvCache(1, H, D, PS, 4, key_rope="pre")
    ps_ = pre.create_sequence()
    pre.append(ps_, 9)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "key_rope"):
        kvsieve.page_bounds(pre, ps_, 0, q[0], 4)
    off = kvsieve.KvCache(1, H, D, PS, 4, track_key_bounds=False)
    os_ = off.create_sequence()
    off.append(os_, 9)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "track_key_bounds"):
        p.select(off, os_, 0, q[0])
    assert snapshot(c, s) == before


def test_sparse_attention_errors(cache):
    c, s = cache  # 6 tokens, 2 layers, 2 KV heads
    q = np.ones((1, 4, D), np.float32)
    ok = [kvsieve.Selection.dense(H, 6)]
    c.decode_sparse(0, [s], q, ok)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "selections[0]", "6 tokens"):
        c.decode_sparse(0, [s], q, [kvsieve.Selection.dense(H, 5)])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "selections"):
        c.decode_sparse(0, [s], q, ok * 2)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "selections[0]", "KV heads"):
        c.decode_sparse(0, [s], q, [kvsieve.Selection.dense(3, 6)])
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "selections[1]", "Selection"):
        c.decode_sparse(0, [s, s], np.ones((2, 4, D), np.float32), [ok[0], [0, 1]])
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "selections"):
        c.decode_sparse(0, [s], q, ok[0])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        c.decode_sparse(2, [s], q, ok)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "position_mode", "sideways"):
        c.decode_sparse(0, [s], q, ok, position_mode="sideways")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "max_distance", "capped"):
        c.decode(0, [s], q, position_mode="capped")
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "max_distance"):
        c.prefill(0, [s], q, [0, 1], position_mode="capped", max_distance=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "max_distance", "None"):
        c.decode_sparse(0, [s], q, ok, max_distance=4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "position_mode", "key_rope"):
        c.decode_sparse(0, [s], q, ok, position_mode="contiguous")
    qo = [0, 2]
    q2 = np.ones((2, 4, D), np.float32)
    c.prefill_sparse(0, [s], q2, qo, ok, [(1, 2), None])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "windows[0].window"):
        c.prefill_sparse(0, [s], q2, qo, ok, [(0, 0), None])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "windows"):
        c.prefill_sparse(0, [s], q2, qo, ok, [(1, 2)])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "windows[1]", "pair"):
        c.prefill_sparse(0, [s], q2, qo, ok, [None, (1, 2, 3)])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "windows[0].sinks"):
        c.prefill_sparse(0, [s], q2, qo, ok, [(-1, 2), None])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "qo_indptr"):
        c.prefill_sparse(0, [s], np.ones((7, 4, D), np.float32), [0, 7], ok)
    k = np.ones((2, PS, H, D), np.float32)
    table = ([0, 2], [0, 1], [2])  # 6 tokens
    kvsieve.paged_decode_sparse(k, k, *table, q, ok)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "selections[0]"):
        kvsieve.paged_decode_sparse(k, k, *table, q, [kvsieve.Selection.dense(H, 7)])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "position_mode"):
        kvsieve.paged_decode(k, k, *table, q, position_mode="capped", max_distance=3)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "windows[1].window"):
        kvsieve.paged_prefill_sparse(k, k, *table, q2, qo, ok, [None, (0, 0)])


def test_compact_errors_change_nothing(cache):
    c, s = cache
    before = snapshot(c, s)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "keep[0][1]", "ascending"):
        c.compact(s, [3, 1])
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "keep[0][1]", "seq_len 6"):
        c.compact(s, [0, 6])
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "keep[0]"):
        c.compact(s, [-1])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "keep", "2 token lists"):
        c.compact(s, [[0, 1]], per="layer")
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "keep", "4 token lists"):
        c.compact(s, [[0, 1], [0, 1]], per="head")
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "keep[1]"):
        c.compact(s, [[0, 1], [0]], per="layer")
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "keep[1][0]"):
        c.compact(s, [[0, 1], [-2, 1]], per="layer")
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "per", "token"):
        c.compact(s, [0], per="token")
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "keep"):
        c.compact(s, 3, per="layer")
    with raises(kvsieve.UnknownSequenceError, ErrorCode.UNKNOWN_SEQUENCE, "99"):
        c.compact(99, [0])
    assert snapshot(c, s) == before
    c.check_invariants()
    # Keys stored before RoPE need the same tokens in every list.
    pre = kvsieve.KvCache(2, H, D, PS, 8, key_rope="pre")
    ps_ = pre.create_sequence()
    pre.append(ps_, 5)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "keep", "same tokens"):
        pre.compact(ps_, [[0, 1], [0, 2]], per="layer")
    # Compaction needs fresh pages before it frees the old ones.
    full = kvsieve.KvCache(2, H, D, PS, 3, dtype="f32")
    fs = full.create_sequence()
    full.append(fs, 8)
    kv_ = np.arange(8 * H * D, dtype=np.float32).reshape(8, H, D)
    full.write(fs, 0, 0, kv_, kv_)
    full.write(fs, 1, 0, kv_, kv_)
    before = snapshot(full, fs)
    with raises(kvsieve.OutOfPagesError, ErrorCode.OUT_OF_PAGES):
        full.compact(fs, [0, 1, 2, 3, 7])
    assert snapshot(full, fs) == before
    full.check_invariants()


def test_gemfilter_errors(cache):
    c, s = cache  # 6 tokens, 2 layers, 2 KV heads of D channels
    before = snapshot(c, s)
    q = np.ones((4, D), np.float32)
    keys = np.ones((6, H, D), np.float32)
    src = dict(cache=c, seq=s, layer=0)
    kvsieve.gemfilter_select(q, keys, k=2)
    kvsieve.gemfilter_select(q, k=2, **src)
    # k, pooling and the forced tokens, from either key source.
    for where in (dict(keys=keys), src):
        for k in (0, 7):
            with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`k`", "1..=6"):
                kvsieve.gemfilter_select(q, k=k, **where)
        for kernel in (0, 4):
            with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`pool_kernel`", "odd"):
                kvsieve.gemfilter_select(q, k=2, pool_kernel=kernel, **where)
        with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`k`", "keep_first + keep_last"):
            kvsieve.gemfilter_select(q, k=5, keep_first=3, keep_last=3, **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`", "num_kv_heads 2", "3 query heads"):
            kvsieve.gemfilter_select(np.ones((3, D), np.float32), k=2, **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`", f"[num_qo_heads, {D}]"):
            kvsieve.gemfilter_scores(np.ones((4, D + 8), np.float32), **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q`"):
            kvsieve.gemfilter_scores(np.ones((2, 4, D), np.float32), **where)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`k`"):
        kvsieve.gemfilter_select(q, keys, k=-1)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`keep_last`"):
        kvsieve.gemfilter_select(q, keys, k=2, keep_last=-1)
    # Exactly one key source.
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`cache`", "keys", "not both"):
        kvsieve.gemfilter_select(q, keys, k=2, **src)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`layer`", "keys"):
        kvsieve.gemfilter_scores(q, keys, layer=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`keys`", "cache=", "neither"):
        kvsieve.gemfilter_select(q, k=2)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`cache`", "seq="):
        kvsieve.gemfilter_scores(q, seq=s, layer=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`seq`", "cache="):
        kvsieve.gemfilter_scores(q, cache=c, layer=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`layer`", "cache="):
        kvsieve.snapkv(q[None], cache=c, seq=s, k=2)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`cache`", "KvCache", "dict"):
        kvsieve.gemfilter_scores(q, cache={}, seq=s, layer=0)
    # Bad keys.
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`keys`", "[n, num_kv_heads, head_dim]"):
        kvsieve.gemfilter_scores(q, keys[0])
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`keys`", "KV head"):
        kvsieve.gemfilter_scores(q, np.ones((6, 0, D), np.float32))
    with raises(kvsieve.UnsupportedError, ErrorCode.UNSUPPORTED, "`keys`", "head_dim 12"):
        kvsieve.gemfilter_scores(np.ones((4, 12), np.float32), np.ones((6, H, 12), np.float32))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "keys", "int32"):
        kvsieve.gemfilter_scores(q, keys.astype(np.int32))
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "keys", "list"):
        kvsieve.gemfilter_scores(q, keys.tolist())
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`q`", "int8"):
        kvsieve.gemfilter_scores(q.astype(np.int8), keys)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`keys`", "non-empty"):
        kvsieve.gemfilter_select(q, keys[:0], k=1)
    # Bad cache sources.
    with raises(kvsieve.UnknownSequenceError, ErrorCode.UNKNOWN_SEQUENCE, "99"):
        kvsieve.gemfilter_scores(q, cache=c, seq=99, layer=0)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "layer"):
        kvsieve.gemfilter_select(q, cache=c, seq=s, layer=2, k=2)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`seq`"):
        kvsieve.gemfilter_scores(q, cache=c, seq=-1, layer=0)
    empty = c.create_sequence()
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`seq`", "empty"):
        kvsieve.gemfilter_select(q, cache=c, seq=empty, layer=0, k=1)
    c.free_sequence(empty)
    pre = kvsieve.KvCache(1, H, D, PS, 4, key_rope="pre")
    ps_ = pre.create_sequence()
    pre.append(ps_, 5)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`cache`", "key_rope"):
        kvsieve.gemfilter_select(q, cache=pre, seq=ps_, layer=0, k=2)
    # avg_pool.
    for kernel in (0, 2):
        with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`kernel`", "odd"):
            kvsieve.avg_pool(np.ones(5, np.float32), kernel)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`kernel`"):
        kvsieve.avg_pool(np.ones(5, np.float32), -3)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`scores`", "1-D"):
        kvsieve.avg_pool(np.ones((2, 3), np.float32), 3)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "scores", "bool"):
        kvsieve.avg_pool(np.ones(5, bool), 3)
    # SnapKV.
    qw = np.ones((2, 4, D), np.float32)
    kvsieve.snapkv(qw, k=3, **src)
    for where in (dict(keys=keys), src):
        for k in (1, 7):
            with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`k`", "2..=6"):
                kvsieve.snapkv(qw, k=k, **where)
        with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`pool_kernel`"):
            kvsieve.snapkv(qw, k=3, pool_kernel=2, **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q_window`", "num_kv_heads 2"):
            kvsieve.snapkv(np.ones((2, 3, D), np.float32), k=3, **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q_window`"):
            kvsieve.snapkv(q, k=3, **where)
        with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`q_window`", "w >= 1"):
            kvsieve.snapkv(qw[:0], k=3, **where)
        with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`q_window`", "1..=6"):
            kvsieve.snapkv(np.ones((7, 4, D), np.float32), k=7, **where)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`scale`", "finite"):
        kvsieve.snapkv(qw, keys, k=3, scale=float("nan"))
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`cache`", "not both"):
        kvsieve.snapkv(qw, keys, k=3, cache=c)
    # Calibration.
    qs, ks = [q, q], [keys, keys]
    assert kvsieve.calibrate_filter_layer(qs, ks, 1, 3, k=2).shape == (2,)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`keys`", "2 key arrays"):
        kvsieve.calibrate_filter_layer(qs, ks[:1], 1, 3, k=2)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`queries`", "at least one layer"):
        kvsieve.calibrate_filter_layer([], [], 1, 3, k=2)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`queries[1]`", "num_kv_heads 2"):
        kvsieve.calibrate_filter_layer([q, q[:3]], ks, 1, 3, k=2)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "`keys[0]`"):
        kvsieve.calibrate_filter_layer(qs, [keys[0], keys], 1, 3, k=2)
    with raises(kvsieve.UnsupportedError, ErrorCode.UNSUPPORTED, "`keys[1]`", "head_dim 12"):
        kvsieve.calibrate_filter_layer(qs, [keys, np.ones((6, H, 12), np.float32)], 1, 3, k=2)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "queries[0]", "complex128"):
        kvsieve.calibrate_filter_layer([q.astype(np.complex128), q], ks, 1, 3, k=2)
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "queries", "int"):
        kvsieve.calibrate_filter_layer(3, ks, 1, 3, k=2)
    for start, end in [(3, 3), (3, 1)]:
        with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`needle_end`", "needle_start"):
            kvsieve.calibrate_filter_layer(qs, ks, start, end, k=2)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`needle_end`", "`keys[0]` holds 6 tokens"):
        kvsieve.calibrate_filter_layer(qs, ks, 1, 7, k=2)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`needle_start`"):
        kvsieve.calibrate_filter_layer(qs, ks, -1, 3, k=2)
    with raises(kvsieve.OutOfRangeError, ErrorCode.OUT_OF_RANGE, "`k`", "1..=6"):
        kvsieve.calibrate_filter_layer(qs, ks, 1, 3, k=0)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "`pool_kernel`"):
        kvsieve.calibrate_filter_layer(qs, ks, 1, 3, k=2, pool_kernel=6)
    assert snapshot(c, s) == before
    c.check_invariants()


def test_errors_are_caught_as_builtins(cache):
    """`except ValueError` (and the other built-ins) catch kvsieve's errors of that nature,
    which keep their code and a plain message."""
    c, s = cache
    with pytest.raises(ValueError) as info:
        kvsieve.KvCache(1, 1, 64, 0, 4)
    assert isinstance(info.value, kvsieve.InvalidArgumentError) and info.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ValueError) as info:
        c.write(s, 0, 0, kv(2), kv(3))
    assert isinstance(info.value, kvsieve.ShapeError)
    with pytest.raises(TypeError) as info:
        c.decode(0, [s], kv(1, dtype=np.int32))
    assert isinstance(info.value, kvsieve.DTypeError) and info.value.code == ErrorCode.DTYPE
    with pytest.raises(KeyError) as info:
        c.seq_len(12345)
    err = info.value
    assert isinstance(err, kvsieve.UnknownSequenceError) and err.code == ErrorCode.UNKNOWN_SEQUENCE
    # Plain text, not KeyError's quoted repr of the message.
    assert str(err) == "unknown sequence id 12345" == err.args[0]
    with pytest.raises(LookupError):
        c.free_sequence(12345)
    with pytest.raises(IndexError) as info:
        c.write(s, 7, 0, kv(1), kv(1))
    assert isinstance(info.value, kvsieve.OutOfRangeError)
    with pytest.raises(MemoryError) as info:
        c.append(s, 10_000)
    assert isinstance(info.value, kvsieve.OutOfPagesError) and info.value.code == ErrorCode.OUT_OF_PAGES
    # Parse errors keep their offset; errors without a built-in base are plain Exceptions.
    with pytest.raises(kvsieve.ParseError) as info:
        kvsieve.Policy("sinks=4,bogus=1")
    assert isinstance(info.value.offset, int) and not isinstance(info.value, ValueError)
    # Raised from Python, the classes behave like any exception class.
    e = kvsieve.UnknownSequenceError("no such sequence")
    assert str(e) == "no such sequence" and e.code == ErrorCode.UNKNOWN_SEQUENCE


def test_errors_pickle():
    import pickle

    for cls in (kvsieve.ShapeError, kvsieve.UnknownSequenceError, kvsieve.OutOfPagesError, kvsieve.InternalError):
        back = pickle.loads(pickle.dumps(cls("message")))
        assert type(back) is cls and str(back) == "message"


def test_a_panic_raises_internal_error():
    """A panic inside the extension is an InternalError (an Exception, so `except
    Exception` catches it), never pyo3's PanicException (a BaseException). The core has no
    known panic to trigger, so the extension has a hidden function that panics through the
    same path as every call into the core."""
    with pytest.raises(kvsieve.InternalError) as info:
        kvsieve._kvsieve._panic_for_tests("boom at 42")
    err = info.value
    assert err.code == ErrorCode.INTERNAL and err.code_name == "internal"
    assert "panic" in str(err) and "boom at 42" in str(err)
    try:
        kvsieve._kvsieve._panic_for_tests("again")
    except Exception as e:  # noqa: BLE001 - the point of the test
        assert type(e) is kvsieve.InternalError
    # The module keeps working after a caught panic.
    c = kvsieve.KvCache(1, 1, 8, 4, 2, dtype="f32")
    assert c.sequences() == []
    assert "_panic_for_tests" not in kvsieve.__all__
