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
    }
    assert len(pairs) == len(ErrorCode) == 12
    for cls, code in pairs.items():
        assert issubclass(cls, kvsieve.KvsieveError)
        assert cls.code is code and cls.code_name == code.name.lower()
        assert cls.__module__ == "kvsieve"
    # Stable values, shared with the C ABI.
    assert [int(c) for c in ErrorCode] == list(range(1, 13))
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
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`k`", "float64"):
        c.write(s, 0, 0, kv(2, dtype=np.float64), kv(2))
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
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`q`", "float64"):
        c.decode(0, [s], kv(1, dtype=np.float64))
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
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "k_pages", "float64"):
        kvsieve.paged_decode(k.astype(np.float64), v, *ok, q)
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
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "lse_a", "float64"):
        kvsieve.merge_states(v, lse.astype(np.float64), v, lse)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with raises(kvsieve.ShapeError, ErrorCode.SHAPE, "positions"):
        kvsieve.apply_rope(x, [1, 2, 3], 1e4)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "theta"):
        kvsieve.apply_rope(x, [1, 2], 0.5)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "rotary_dim"):
        kvsieve.apply_rope(x, [1, 2], 1e4, rotary_dim=7)
    with raises(kvsieve.InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "style"):
        kvsieve.apply_rope(x, [1, 2], 1e4, style="neox")
    with raises(kvsieve.DTypeError, ErrorCode.DTYPE, "`x`", "float64"):
        kvsieve.apply_rope(x.astype(np.float64), [1, 2], 1e4)
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
