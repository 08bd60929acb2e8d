"""GemFilter (gemfilter_scores, avg_pool, gemfilter_select), SnapKV and filter-layer
calibration against numpy implementations of their definitions, from key arrays (any
strides, float32/float16) and from a KvCache; SnapKV's selection compacts a cache whose
decode then equals attention over the kept tokens."""

import threading

import numpy as np
import pytest

import kvsieve
import reference

D = 64


def ref_scores(q, keys):
    """Sum over query heads h of q[h] · keys[:, h // group], in float64."""
    q = np.asarray(q, np.float64).reshape(-1, np.shape(q)[-1])
    k = np.asarray(keys, np.float64)
    group = q.shape[0] // k.shape[1]
    return sum(k[:, h // group] @ q[h] for h in range(q.shape[0]))


def ref_pool(x, kernel):
    """Centred mean over the neighbours that exist."""
    r = kernel // 2
    return np.array([np.mean(x[max(0, i - r) : i + r + 1]) for i in range(len(x))])


def ref_snapkv_votes(q_window, keys, scale=None):
    """Per KV head, the softmax probabilities the window queries give the prefix, summed over
    the window and the head's query group. Window query i is token n - w + i and sees the
    tokens up to itself."""
    qw = np.asarray(q_window, np.float64)
    k = np.asarray(keys, np.float64)
    w, hq, d = qw.shape
    n, hk, _ = k.shape
    group = hq // hk
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    prefix = n - w
    votes = np.zeros((hk, prefix))
    for i in range(w):
        for h in range(hq):
            s = scale * (k[: prefix + i + 1, h // group] @ qw[i, h])
            p = np.exp(s - s.max())
            votes[h // group] += p[:prefix] / p.sum()
    return votes


def check_topk(kept, score, k, forced, eps):
    """`kept` is k ascending uint32 indices holding every forced token, and every other kept
    token scores at least as high (within eps) as every token left out. Robust to float ties."""
    kept = np.asarray(kept)
    assert kept.dtype == np.uint32
    assert len(kept) == k
    assert np.all(np.diff(kept.astype(np.int64)) > 0), kept
    chosen = set(kept.tolist())
    n = len(score)
    assert all(t in chosen for t in range(n) if forced(t)), "a forced token is missing"
    free = [score[t] for t in chosen if not forced(t)]
    left = [score[t] for t in range(n) if t not in chosen]
    if free and left:
        assert min(free) >= max(left) - eps, (min(free), max(left))


def strided_keys(rng, n, hk, d, dtype, how, scale=1.0):
    """Keys [n, hk, d] as a plain array, a row-strided view, or a view whose channels are
    not contiguous; returns (view, the same values as float64)."""
    base = (scale * rng.standard_normal((n, hk, d))).astype(dtype)
    if how == "contiguous":
        view = base
    elif how == "rows":
        wide = np.zeros((2 * n, hk, d), dtype)
        wide[::2] = base
        view = wide[::2]
    else:
        t = np.ascontiguousarray(base.transpose(2, 1, 0))
        view = t.transpose(2, 1, 0)
        assert view.strides[2] != view.itemsize
    return view, base.astype(np.float64)


def fill_cache(rng, n, hk, dtype="f32", layers=1, page_size=16, spare=1, scale=1.0):
    c = kvsieve.KvCache(layers, hk, D, page_size, -(-n // page_size) + spare, dtype=dtype)
    s = c.create_sequence()
    c.append(s, n)
    for layer in range(layers):
        k = (scale * rng.standard_normal((n, hk, D))).astype(np.float32)
        v = rng.standard_normal((n, hk, D)).astype(np.float32)
        c.write(s, layer, 0, k, v)
    return c, s


# --- scores and pooling -------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("how", ["contiguous", "rows", "channels"])
def test_scores_from_arrays_match_numpy(rng, group, dtype, how):
    n, hk = 123, 2
    keys, k64 = strided_keys(rng, n, hk, D, dtype, how)
    q = rng.standard_normal((hk * group, D)).astype(np.float32)
    got = kvsieve.gemfilter_scores(q, keys)
    assert got.dtype == np.float32 and got.shape == (n,)
    want = ref_scores(q, k64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # The query may carry a leading 1 and be any float view.
    q3 = np.zeros((1, hk * group, 2 * D), np.float16)
    q3[..., ::2] = q
    np.testing.assert_allclose(kvsieve.gemfilter_scores(q3[..., ::2], keys), ref_scores(q3[..., ::2], k64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_scores_from_cache_match_numpy(rng, dtype):
    n, hk, group = 77, 2, 2
    c, s = fill_cache(rng, n, hk, dtype, layers=2)
    q = rng.standard_normal((hk * group, D)).astype(np.float32)
    for layer in range(2):
        got = kvsieve.gemfilter_scores(q, cache=c, seq=s, layer=layer)
        want = ref_scores(q, c.read_keys(s, layer))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        # The cache's keys as an array give the same scores.
        np.testing.assert_allclose(kvsieve.gemfilter_scores(q, c.read_keys(s, layer)), got, rtol=1e-5, atol=1e-4)
    # An empty sequence has no scores.
    e = c.create_sequence()
    assert kvsieve.gemfilter_scores(q, cache=c, seq=e, layer=0).shape == (0,)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 50])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
def test_avg_pool_matches_numpy(rng, n, kernel):
    x = rng.standard_normal(n).astype(np.float32)
    got = kvsieve.avg_pool(x, kernel)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, ref_pool(x.astype(np.float64), kernel), rtol=1e-6, atol=1e-6)
    h = x.astype(np.float16)
    np.testing.assert_allclose(kvsieve.avg_pool(h, kernel), ref_pool(h.astype(np.float64), kernel), rtol=1e-6, atol=1e-6)
    if kernel == 1:
        assert np.array_equal(got, x)


def test_avg_pool_edges_average_fewer_entries():
    x = np.array([3.0, 0.0, 0.0, 0.0, 6.0], np.float32)
    assert kvsieve.avg_pool(x, 3).tolist() == [1.5, 1.0, 0.0, 2.0, 3.0]
    np.testing.assert_allclose(kvsieve.avg_pool(x, 5), [1.0, 0.75, 1.8, 1.5, 2.0], rtol=1e-6)
    assert kvsieve.avg_pool(np.zeros(0, np.float32), 5).shape == (0,)


# --- selection ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 9, 200, 1500])
@pytest.mark.parametrize("kernel", [1, 5, 7])
@pytest.mark.parametrize("first,last", [(0, 0), (3, 2), (1, 7)])
def test_select_is_a_top_k_of_the_pooled_scores(rng, n, kernel, first, last):
    hk, group = 2, 4
    keys, k64 = strided_keys(rng, n, hk, D, np.float16, "rows")
    q = rng.standard_normal((hk * group, D)).astype(np.float32)
    pooled = ref_pool(ref_scores(q, k64), kernel)
    first, last = min(first, n), min(last, n)
    forced = lambda t: t < first or t + last >= n  # noqa: E731
    eps = 1e-5 * (1 + np.abs(pooled).max())
    for k in sorted({max(1, first + last), max(1, n // 10), max(1, n // 2), n}):
        if first + last > k or k > n:
            continue
        kept = kvsieve.gemfilter_select(q, keys, k=k, pool_kernel=kernel, keep_first=first, keep_last=last)
        check_topk(kept, pooled, k, forced, eps)
        # The same as ranking avg_pool(gemfilter_scores) with the forced tokens first.
        ranked = kvsieve.avg_pool(kvsieve.gemfilter_scores(q, keys), kernel)
        ranked[[t for t in range(n) if forced(t)]] = np.inf
        assert np.array_equal(kept, kvsieve.top_k(ranked, k))


def test_select_breaks_ties_by_lower_index_and_forces_first_and_last():
    n, hk = 40, 2
    keys = np.zeros((n, hk, D), np.float32)  # every score is exactly 0
    q = np.ones((4, D), np.float32)
    assert kvsieve.gemfilter_select(q, keys, k=6).tolist() == list(range(6))
    kept = kvsieve.gemfilter_select(q, keys, k=6, keep_first=1, keep_last=3)
    assert kept.tolist() == [0, 1, 2, 37, 38, 39]
    # A token whose pooled score stands out is kept over the ties, its neighbours next.
    keys[20] = 1.0
    kept = kvsieve.gemfilter_select(q, keys, k=5, pool_kernel=3, keep_last=1)
    assert kept.tolist() == [0, 19, 20, 21, 39]


def test_select_from_cache_equals_select_from_its_keys(rng):
    n, hk = 300, 2
    c, s = fill_cache(rng, n, hk, "f16", layers=2)
    q = rng.standard_normal((1, hk * 3, D)).astype(np.float32)
    for layer in range(2):
        a = kvsieve.gemfilter_select(q, cache=c, seq=s, layer=layer, k=40, keep_first=4, keep_last=8)
        b = kvsieve.gemfilter_select(q, c.read_keys(s, layer), k=40, keep_first=4, keep_last=8)
        assert a.dtype == np.uint32 and a.shape == (40,)
        check_topk(a, ref_pool(ref_scores(q, c.read_keys(s, layer)), 5), 40, lambda t: t < 4 or t >= n - 8, 1e-3)
        assert np.array_equal(a, b)


# --- SnapKV -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,w", [(2, 1), (5, 5), (60, 8), (257, 16), (300, 1)])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("source", ["cache", "array"])
def test_snapkv_matches_its_definition(rng, n, w, group, source):
    hk = 2
    hq = hk * group
    qw = rng.standard_normal((w, hq, D)).astype(np.float32)
    if source == "cache":
        c, s = fill_cache(rng, n, hk, "f32", scale=2.0)
        keys = c.read_keys(s, 0)
        src = dict(cache=c, seq=s, layer=0)
    else:
        keys, _ = strided_keys(rng, n, hk, D, np.float32, "channels", scale=2.0)
        src = dict(keys=keys)
    votes = ref_snapkv_votes(qw, keys)
    prefix = n - w
    for k in sorted({w, w + (n - w) // 3, n}):
        sel, union = kvsieve.snapkv(qw, k=k, **src)
        assert isinstance(sel, kvsieve.Selection)
        assert sel.num_kv_heads == hk and sel.seq_len == n and len(sel) == hk * k
        for h in range(hk):
            score = np.concatenate([ref_pool(votes[h], 7), np.full(w, np.inf)])
            check_topk(sel.head(h), score, k, lambda t: t >= prefix, 1e-5 * (1 + w * group))
        assert union.dtype == np.uint32
        assert union.tolist() == sorted(set(np.concatenate([sel.head(h) for h in range(hk)]).tolist()))


def test_snapkv_scale_and_pool_kernel(rng):
    n, w, hk, hq = 120, 4, 2, 4
    keys = rng.standard_normal((n, hk, D)).astype(np.float32)
    qw = rng.standard_normal((w, hq, D)).astype(np.float32)
    for scale, kernel in [(0.5, 1), (0.05, 3), (None, 7)]:
        sel, _ = kvsieve.snapkv(qw, keys, k=30, pool_kernel=kernel, scale=scale)
        votes = ref_snapkv_votes(qw, keys, scale)
        for h in range(hk):
            score = np.concatenate([ref_pool(votes[h], kernel), np.full(w, np.inf)])
            check_topk(sel.head(h), score, 30, lambda t: t >= n - w, 1e-5)


def test_snapkv_compact_then_decode_reads_the_kept_tokens(rng):
    layers, hk, hq, n, w, k = 2, 2, 8, 150, 6, 40
    c, s = fill_cache(rng, n, hk, "f32", layers=layers, spare=4)
    keys = [c.read_keys(s, layer) for layer in range(layers)]
    values = [c.read_values(s, layer) for layer in range(layers)]
    sels = []
    for layer in range(layers):
        qw = rng.standard_normal((w, hq, D)).astype(np.float32)
        sel, union = kvsieve.snapkv(qw, cache=c, seq=s, layer=layer, k=k)
        assert sel == kvsieve.snapkv(qw, keys[layer], k=k)[0]
        sels.append(sel)
    c.compact(s, [sels[layer].head(h) for layer in range(layers) for h in range(hk)], per="head")
    assert c.seq_len(s) == k
    for layer in range(layers):
        for h in range(hk):
            np.testing.assert_array_equal(c.read_keys(s, layer)[:, h], keys[layer][sels[layer].head(h), h])
    c.check_invariants()
    # One decode step on the compacted sequence.
    c.append(s, 1)
    q = rng.standard_normal((1, hq, D)).astype(np.float32)
    for layer in range(layers):
        kn = rng.standard_normal((1, hk, D)).astype(np.float32)
        vn = rng.standard_normal((1, hk, D)).astype(np.float32)
        c.write(s, layer, k, kn, vn)
        out, lse = c.decode(layer, [s], q)
        heads = [np.append(sels[layer].head(h), n) for h in range(hk)]
        ro, rl = reference.selected_attention(
            q, [n], np.concatenate([keys[layer], kn]), np.concatenate([values[layer], vn]), heads
        )
        np.testing.assert_allclose(out, ro, atol=2e-4)
        np.testing.assert_allclose(lse, rl, atol=2e-4)


# --- calibration --------------------------------------------------------------------------


def planted_layers(rng, n, hk, hq, needle, seen_by, dtype=np.float32):
    """Per layer, a last query and keys; in the layers of `seen_by` the needle's keys point
    along their KV head's summed group queries."""
    group = hq // hk
    queries, keys = [], []
    for layer in range(4):
        q = rng.standard_normal((hq, D)).astype(np.float32)
        k = 0.3 * rng.standard_normal((n, hk, D))
        if layer in seen_by:
            for h in range(hk):
                k[needle, h] += q[h * group : (h + 1) * group].sum(axis=0)
        queries.append(q)
        keys.append(k.astype(dtype))
    return queries, keys


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_calibration_finds_the_layer_that_sees_the_needle(rng, dtype):
    n, hk, hq = 400, 2, 4
    needle = slice(210, 222)
    queries, keys = planted_layers(rng, n, hk, hq, needle, seen_by={2}, dtype=dtype)
    recall = kvsieve.calibrate_filter_layer(queries, keys, needle.start, needle.stop, k=32)
    assert recall.dtype == np.float64 and recall.shape == (4,)
    assert recall[2] == 1.0
    assert all(recall[layer] < 0.5 for layer in (0, 1, 3)), recall
    assert int(np.argmax(recall)) == 2
    # Each entry is the share of the needle gemfilter_select keeps at that layer.
    for layer in range(4):
        kept = kvsieve.gemfilter_select(queries[layer][None], keys[layer], k=32)
        share = np.isin(np.arange(needle.start, needle.stop), kept).mean()
        assert recall[layer] == share
    # Tuples, forced tokens and [1, hq, d] queries are accepted.
    r2 = kvsieve.calibrate_filter_layer(tuple(q[None] for q in queries), tuple(keys), 210, 222, k=40, keep_first=4, keep_last=4)
    assert r2[2] == 1.0


def test_calibration_on_cache_layers(rng):
    """The earliest layer with full recall, from queries and a cache's keys per layer."""
    n, hk, hq = 500, 2, 8
    needle = slice(300, 310)
    queries, keys = planted_layers(rng, n, hk, hq, needle, seen_by={1, 2, 3})
    c = kvsieve.KvCache(4, hk, D, 32, 16, dtype="f16")
    s = c.create_sequence()
    c.append(s, n)
    for layer in range(4):
        c.write(s, layer, 0, keys[layer], keys[layer])
    recall = kvsieve.calibrate_filter_layer(queries, [c.read_keys(s, layer) for layer in range(4)], 300, 310, k=64)
    best = int(np.flatnonzero(recall >= 0.9)[0])
    assert best == 1 and recall[0] < 0.5
    kept = kvsieve.gemfilter_select(queries[best], cache=c, seq=s, layer=best, k=64)
    assert set(range(300, 310)) <= set(kept.tolist())


def test_calls_run_in_parallel_threads(rng):
    n, hk, hq = 2000, 2, 8
    c, s = fill_cache(rng, n, hk, "f16", layers=2)
    qs = [rng.standard_normal((hq, D)).astype(np.float32) for _ in range(8)]
    want = [kvsieve.gemfilter_select(q, cache=c, seq=s, layer=i % 2, k=100) for i, q in enumerate(qs)]
    got = [None] * len(qs)

    def work(i):
        got[i] = kvsieve.gemfilter_select(qs[i], cache=c, seq=s, layer=i % 2, k=100)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
