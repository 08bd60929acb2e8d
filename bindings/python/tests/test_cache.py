"""KvCache bookkeeping from Python: sequences, slots, writes, fork, truncate, evict, page tables."""

import numpy as np
import pytest

import kvsieve

H, D, PS = 2, 16, 4
# Largest relative error of one stored element, per cache dtype.
STORE_RTOL = {"f32": 1e-7, "f16": 1e-3, "bf16": 8e-3}


def make_cache(dtype="f32", capacity_pages=32, layers=2, **kw):
    return kvsieve.KvCache(layers, H, D, PS, capacity_pages, dtype=dtype, **kw)


def fill(cache, rng, seq, n, layers=2):
    """Append n tokens and write random K/V at every layer; returns {layer: (k, v)}."""
    start = cache.seq_len(seq)
    cache.append(seq, n)
    kv = {}
    for layer in range(layers):
        k = rng.standard_normal((n, H, D)).astype(np.float32)
        v = rng.standard_normal((n, H, D)).astype(np.float32)
        cache.write(seq, layer, start, k, v)
        kv[layer] = (k, v)
    return kv


def test_config_and_repr():
    c = kvsieve.KvCache(3, 2, 64, 16, 10, dtype="bf16", layout="hnd", key_rope="pre", track_key_bounds=False)
    cfg = c.config
    assert isinstance(cfg, kvsieve.CacheConfig)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.capacity_pages) == (3, 2, 64, 16, 10)
    assert (cfg.dtype, cfg.layout, cfg.key_rope, cfg.track_key_bounds) == ("bf16", "hnd", "pre", False)
    assert "page_size=16" in repr(cfg)
    assert "KvCache(" in repr(c)
    default = kvsieve.KvCache(1, 1, 8, 1, 1).config
    assert (default.dtype, default.layout, default.key_rope, default.track_key_bounds) == ("f16", "nhd", "post", True)


def test_sequences_append_and_positions():
    c = make_cache()
    a, b = c.create_sequence(), c.create_sequence()
    assert c.sequences() == [a, b]
    slots = c.append(a, 6)
    assert slots.dtype == np.int64 and slots.shape == (6,)
    pages = c.seq_pages(a)
    assert pages.dtype == np.int32 and len(pages) == 2
    np.testing.assert_array_equal(slots, [pages[t // PS] * PS + t % PS for t in range(6)])
    np.testing.assert_array_equal(c.positions(a), np.arange(6))
    c.append(a, 2, positions=np.array([100, 101], dtype=np.int64))
    c.append(a, 1)
    np.testing.assert_array_equal(c.positions(a), [0, 1, 2, 3, 4, 5, 100, 101, 102])
    assert c.positions(a).dtype == np.int32
    c.append(b, 3, positions=[7, 3, 5])
    np.testing.assert_array_equal(c.positions(b), [7, 3, 5])
    assert c.seq_len(a) == 9 and c.seq_len(b) == 3
    c.free_sequence(a)
    assert c.sequences() == [b]
    c.check_invariants()


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_write_and_read_back(rng, dtype, layout):
    c = make_cache(dtype, layout=layout)
    s = c.create_sequence()
    kv = fill(c, rng, s, 11)
    for layer, (k, v) in kv.items():
        np.testing.assert_allclose(c.read_keys(s, layer), k, rtol=STORE_RTOL[dtype], atol=1e-6)
        np.testing.assert_allclose(c.read_values(s, layer), v, rtol=STORE_RTOL[dtype], atol=1e-6)
        assert c.read_keys(s, layer).dtype == np.float32


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_float16_input_into_every_cache_dtype(rng, dtype):
    c = make_cache(dtype)
    s = c.create_sequence()
    c.append(s, 7)
    k = rng.standard_normal((7, H, D)).astype(np.float16)
    v = rng.standard_normal((7, H, D)).astype(np.float16)
    c.write(s, 0, 0, k, v)
    np.testing.assert_allclose(c.read_keys(s, 0), k.astype(np.float32), rtol=STORE_RTOL[dtype], atol=1e-6)
    np.testing.assert_allclose(c.read_values(s, 0), v.astype(np.float32), rtol=STORE_RTOL[dtype], atol=1e-6)


def test_write_accepts_float16_and_strided_views(rng):
    c = make_cache("f32")
    s = c.create_sequence()
    c.append(s, 5)
    # float16 input, converted to the cache dtype.
    k16 = rng.standard_normal((5, H, D)).astype(np.float16)
    v16 = rng.standard_normal((5, H, D)).astype(np.float16)
    c.write(s, 0, 0, k16, v16)
    np.testing.assert_array_equal(c.read_keys(s, 0), k16.astype(np.float32))
    # A transposed view ([H, n, D] memory read as [n, H, D]) and a channel-strided slice.
    k_t = rng.standard_normal((H, 5, D)).astype(np.float32).transpose(1, 0, 2)
    v_s = rng.standard_normal((5, H, 2 * D)).astype(np.float32)[:, :, ::2]
    assert not k_t.flags.c_contiguous and not v_s.flags.c_contiguous
    c.write(s, 1, 0, k_t, v_s)
    np.testing.assert_array_equal(c.read_keys(s, 1), k_t)
    np.testing.assert_array_equal(c.read_values(s, 1), v_s)
    # A reversed view (negative strides) is copied, not rejected.
    k_r = rng.standard_normal((5, H, D)).astype(np.float32)[::-1]
    c.write(s, 1, 0, k_r, k_r)
    np.testing.assert_array_equal(c.read_keys(s, 1), k_r)


def test_write_slots(rng):
    c = make_cache("f32")
    s = c.create_sequence()
    fill(c, rng, s, 3)
    slots = c.append(s, 5)
    k = rng.standard_normal((5, H, D)).astype(np.float32)
    v = rng.standard_normal((5, H, D)).astype(np.float32)
    c.write_slots(s, 0, slots, k, v)
    np.testing.assert_array_equal(c.read_keys(s, 0)[3:], k)
    np.testing.assert_array_equal(c.read_values(s, 0)[3:], v)
    c.write_slots(s, 1, list(slots[::-1]), k, v)
    np.testing.assert_array_equal(c.read_keys(s, 1)[3:], k[::-1])


def test_fork_shares_pages_and_copies_on_write(rng):
    c = make_cache("f32")
    a = c.create_sequence()
    kv = fill(c, rng, a, 6)  # pages: one full, one with 2 of 4 slots
    used = c.stats()["pages_used"]
    b = c.fork(a)
    assert c.stats()["pages_used"] == used
    np.testing.assert_array_equal(c.seq_pages(a), c.seq_pages(b))
    for p in c.seq_pages(a):
        assert c.page_refcount(int(p)) == 2
    # b appends into the shared last page: it gets its own copy; a is unchanged.
    fill(c, rng, b, 1)
    assert c.seq_pages(a)[-1] != c.seq_pages(b)[-1]
    assert c.seq_pages(a)[0] == c.seq_pages(b)[0]
    np.testing.assert_array_equal(c.read_keys(a, 0), kv[0][0])
    np.testing.assert_array_equal(c.read_keys(b, 0)[:6], kv[0][0])
    # Overwriting a shared full page in b leaves a's copy alone.
    new = rng.standard_normal((1, H, D)).astype(np.float32)
    c.write(b, 0, 0, new, new)
    np.testing.assert_array_equal(c.read_keys(a, 0), kv[0][0])
    np.testing.assert_array_equal(c.read_keys(b, 0)[0], new[0])
    c.check_invariants()
    c.free_sequence(a)
    c.free_sequence(b)
    assert c.stats()["pages_used"] == 0
    c.check_invariants()


def test_truncate_and_evict(rng):
    c = make_cache("f32")
    s = c.create_sequence()
    kv = fill(c, rng, s, 14)  # 4 pages: 4 + 4 + 4 + 2
    c.truncate(s, 9)
    assert c.seq_len(s) == 9 and len(c.seq_pages(s)) == 3
    np.testing.assert_array_equal(c.read_keys(s, 1), kv[1][0][:9])
    pages = c.seq_pages(s)
    c.evict_pages(s, [0, 1])  # drop tokens 0..8; token 8 remains, keeping its position
    assert c.seq_len(s) == 1
    np.testing.assert_array_equal(c.seq_pages(s), pages[2:])
    np.testing.assert_array_equal(c.positions(s), [8])
    np.testing.assert_array_equal(c.read_values(s, 0), kv[0][1][8:9])
    c.truncate(s, 0)
    assert c.seq_len(s) == 0 and len(c.seq_pages(s)) == 0
    assert c.stats()["pages_used"] == 0
    c.check_invariants()


def test_page_table(rng):
    c = make_cache("f32")
    seqs = [c.create_sequence() for _ in range(3)]
    for s, n in zip(seqs, [5, 0, 8]):
        if n:
            fill(c, rng, s, n)
    indptr, indices, last = c.page_table([seqs[2], seqs[0], seqs[1]])
    for arr in (indptr, indices, last):
        assert arr.dtype == np.int32
    np.testing.assert_array_equal(indptr, [0, 2, 4, 4])
    np.testing.assert_array_equal(indices, np.concatenate([c.seq_pages(seqs[2]), c.seq_pages(seqs[0])]))
    np.testing.assert_array_equal(last, [4, 1, 0])
    indptr, indices, last = c.page_table(np.array([seqs[0]], dtype=np.uint64))
    np.testing.assert_array_equal(indptr, [0, 2])


def test_page_key_bounds(rng):
    c = make_cache("f32")
    s = c.create_sequence()
    kv = fill(c, rng, s, 6)
    k = kv[1][0]
    lo, hi = c.page_key_bounds(s, 1, 1)
    assert lo.shape == (H, D) and lo.dtype == np.float32
    np.testing.assert_array_equal(lo, k[4:6].min(axis=0))
    np.testing.assert_array_equal(hi, k[4:6].max(axis=0))
    c.truncate(s, 5)
    lo, hi = c.page_key_bounds(s, 1, 1)
    np.testing.assert_array_equal(lo, k[4])
    np.testing.assert_array_equal(hi, k[4])
    off = make_cache(track_key_bounds=False)
    s2 = off.create_sequence()
    off.append(s2, 1)
    with pytest.raises(kvsieve.InvalidArgumentError, match="track_key_bounds"):
        off.page_key_bounds(s2, 0, 0)


def test_stats():
    c = make_cache("f16", capacity_pages=8)
    st = c.stats()
    assert set(st) == {
        "pages_total",
        "pages_used",
        "pages_free",
        "bytes_per_page",
        "bytes_used",
        "bytes_reserved",
        "num_sequences",
        "num_tokens",
    }
    assert st["pages_total"] == 8 and st["pages_used"] == 0 and st["pages_free"] == 8
    assert st["bytes_per_page"] == 2 * 2 * PS * H * D * 2
    s = c.create_sequence()
    c.append(s, 5)
    st = c.stats()
    assert (st["pages_used"], st["num_sequences"], st["num_tokens"]) == (2, 1, 5)
    assert st["bytes_used"] == 2 * st["bytes_per_page"]
