"""float64 arrays are accepted wherever float32 is, as a float32 copy: every call gives
exactly what it gives for `x.astype(np.float32)`. Other dtypes keep raising DTypeError."""

import numpy as np
import pytest

import kvsieve

H, HQ, D, PS = 2, 4, 32, 4


def f32(x):
    return np.asarray(x).astype(np.float32)


def assert_same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def filled_cache(k, v):
    c = kvsieve.KvCache(1, H, D, PS, 16, dtype="f32")
    s = c.create_sequence()
    c.append(s, len(k))
    c.write(s, 0, 0, k, v)
    return c, s


def test_cache_write(rng):
    k = rng.standard_normal((10, H, D))
    v = rng.standard_normal((10, H, D))
    assert k.dtype == np.float64
    c64, s64 = filled_cache(k, v)
    c32, s32 = filled_cache(f32(k), f32(v))
    assert_same(c64.read_keys(s64, 0), c32.read_keys(s32, 0))
    assert_same(c64.read_values(s64, 0), c32.read_values(s32, 0))
    # write_slots, and a reversed (negative-stride) float64 view.
    slots = c64.append(s64, 3)
    kk = rng.standard_normal((3, H, D))[::-1]
    c64.write_slots(s64, 0, slots, kk, kk)
    c32.write_slots(s32, 0, c32.append(s32, 3), f32(kk), f32(kk))
    assert_same(c64.read_keys(s64, 0), c32.read_keys(s32, 0))
    # Other dtypes are still refused.
    with pytest.raises(kvsieve.DTypeError, match="float32, float16 or float64"):
        c64.write(s64, 0, 0, k.astype(np.int64), v)
    with pytest.raises(kvsieve.DTypeError):
        c64.write(s64, 0, 0, k.astype(np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else k.astype(np.complex128), v)


def test_decode(rng):
    k = rng.standard_normal((9, H, D)).astype(np.float32)
    c, s = filled_cache(k, k)
    q = rng.standard_normal((1, HQ, D))
    assert_same(c.decode(0, [s], q), c.decode(0, [s], f32(q)))
    qp = rng.standard_normal((3, HQ, D))
    assert_same(c.prefill(0, [s], qp, [0, 3]), c.prefill(0, [s], f32(qp), [0, 3]))
    sel = kvsieve.streaming(H, 9, 2, 3)
    assert_same(c.decode_sparse(0, [s], q, [sel]), c.decode_sparse(0, [s], f32(q), [sel]))
    assert_same(c.decode_with_policy(0, [s], q, "sinks=2,window=3")[:2], c.decode_with_policy(0, [s], f32(q), "sinks=2,window=3")[:2])
    # Engine-owned pages and the query, both float64.
    k_pages = rng.standard_normal((3, PS, H, D))
    v_pages = rng.standard_normal((3, PS, H, D))
    table = ([0, 3], [2, 0, 1], [2])
    got = kvsieve.paged_decode(k_pages, v_pages, *table, q)
    assert_same(got, kvsieve.paged_decode(f32(k_pages), f32(v_pages), *table, f32(q)))
    # merge_states takes float64 states and LSEs.
    out, lse = got
    assert_same(
        kvsieve.merge_states(out.astype(np.float64), lse.astype(np.float64), out, lse),
        kvsieve.merge_states(out, lse, out, lse),
    )
    with pytest.raises(kvsieve.DTypeError, match="`q`"):
        c.decode(0, [s], q.astype(np.int32))


def test_selection_scores_and_gemfilter(rng):
    keys = rng.standard_normal((40, H, D))
    q = rng.standard_normal((HQ, D))
    scores = kvsieve.gemfilter_scores(q, keys)
    assert_same(scores, kvsieve.gemfilter_scores(f32(q), f32(keys)))
    assert_same(kvsieve.gemfilter_select(q, keys, k=8), kvsieve.gemfilter_select(f32(q), f32(keys), k=8))
    qw = rng.standard_normal((4, HQ, D))
    sel64, union64 = kvsieve.snapkv(qw, keys, k=12)
    sel32, union32 = kvsieve.snapkv(f32(qw), f32(keys), k=12)
    assert sel64 == sel32
    assert_same(union64, union32)
    s64 = scores.astype(np.float64)
    assert_same(kvsieve.top_k(s64, 5), kvsieve.top_k(scores, 5))
    assert_same(kvsieve.avg_pool(s64, 3), kvsieve.avg_pool(scores, 3))
    # A float64 query against a cache (Quest page bounds and a policy's selection).
    c, s = filled_cache(f32(keys), f32(keys))
    qd = rng.standard_normal((HQ, D))
    assert kvsieve.page_bounds(c, s, 0, qd, 8) == kvsieve.page_bounds(c, s, 0, f32(qd), 8)
    policy = kvsieve.Policy("sinks=2,window=4,pages=8")
    assert policy.select(c, s, 0, qd) == policy.select(c, s, 0, f32(qd))
    with pytest.raises(kvsieve.DTypeError, match="`q`"):
        kvsieve.gemfilter_scores(q.astype(np.int16), keys)


def test_clustering(rng):
    keys = rng.standard_normal((60, H, D))
    idx64 = kvsieve.ClusterIndex.build(keys, clusters=6, seed=3)
    idx32 = kvsieve.ClusterIndex.build(f32(keys), clusters=6, seed=3)
    for h in range(H):
        for part in ("centroids", "sizes", "radii", "assignment"):
            assert_same(getattr(idx64, part)(h), getattr(idx32, part)(h))
    q = rng.standard_normal((HQ, D))
    sel64, _ = idx64.retrieve(q, budget=10)
    sel32, _ = idx32.retrieve(f32(q), budget=10)
    assert sel64 == sel32
    assert_same(idx64.cluster_estimates(q), idx32.cluster_estimates(f32(q)))
    rows = keys[:, 0]
    a, b = kvsieve.kmeans(rows, 5, seed=1), kvsieve.kmeans(f32(rows), 5, seed=1)
    assert a.keys() == b.keys()
    for name in a:
        assert_same(a[name], b[name])
    assert_same(kvsieve.kmeans_seeds(rows, 4, seed=2), kvsieve.kmeans_seeds(f32(rows), 4, seed=2))
    with pytest.raises(kvsieve.DTypeError, match="`keys`"):
        kvsieve.kmeans(rows.astype(np.int64), 5)


def test_apply_rope(rng):
    x = rng.standard_normal((3, 2, 16))
    got = kvsieve.apply_rope(x, [0, 5, 9], 1e4)
    assert got.dtype == np.float32
    assert_same(got, kvsieve.apply_rope(f32(x), [0, 5, 9], 1e4))
    # In place needs an array of the kind it writes.
    with pytest.raises(kvsieve.DTypeError, match="in place"):
        kvsieve.apply_rope(x, [0, 5, 9], 1e4, inplace=True)
