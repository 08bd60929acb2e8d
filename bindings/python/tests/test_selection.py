"""Selection (CSR over KV heads) and the functions that make one: streaming, lambda_mask,
page_bounds, top_k, window_pages_to_evict, checked against plain Python."""

import numpy as np
import pytest

import kvsieve

D = 32


def random_heads(rng, hk, seq_len, density):
    return [np.flatnonzero(rng.random(seq_len) < density).astype(np.uint32) for _ in range(hk)]


def heads_of(sel):
    return [sel.head(h).tolist() for h in range(sel.num_kv_heads)]


def test_constructors_and_properties():
    s = kvsieve.Selection.from_csr(10, [0, 3, 3, 5], np.array([1, 4, 9, 0, 2], dtype=np.int64))
    assert (s.num_kv_heads, s.seq_len, len(s), s.len()) == (3, 10, 5, 5)
    assert s.head_indptr.dtype == np.uint32 and s.indices.dtype == np.uint32
    np.testing.assert_array_equal(s.head_indptr, [0, 3, 3, 5])
    np.testing.assert_array_equal(s.indices, [1, 4, 9, 0, 2])
    assert heads_of(s) == [[1, 4, 9], [], [0, 2]]
    assert s.head(0).dtype == np.uint32
    assert not s.is_empty() and not s.is_dense()
    same = kvsieve.Selection.from_heads(10, [np.array([1, 4, 9]), [], (0, 2)])
    assert same == s and hash(same) == hash(s)
    assert kvsieve.Selection.from_heads(11, [[1, 4, 9], [], [0, 2]]) != s
    dense = kvsieve.Selection.dense(2, 4)
    assert dense.is_dense() and heads_of(dense) == [[0, 1, 2, 3]] * 2 and len(dense) == 8
    shared = kvsieve.Selection.same_for_all_heads(3, 8, [0, 5, 7])
    assert heads_of(shared) == [[0, 5, 7]] * 3
    empty = kvsieve.Selection.from_heads(0, [[], []])
    assert empty.is_empty() and empty.is_dense() and len(empty) == 0
    r = repr(s)
    assert r.startswith("Selection(") and "num_kv_heads=3" in r and "seq_len=10" in r and "per_head=[3, 0, 2]" in r
    # The arrays are copies: changing them leaves the selection alone.
    idx = s.indices
    idx[0] = 7
    assert s.indices[0] == 1


def test_stats():
    s = kvsieve.Selection.from_heads(10, [[0, 1, 2, 3], [5], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    st = s.stats()
    assert st == {
        "seq_len": 10,
        "per_head": [4, 1, 9],
        "total": 14,
        "density": pytest.approx(14 / 30),
        "min_density": pytest.approx(0.1),
        "max_density": pytest.approx(0.9),
    }
    assert kvsieve.Selection.dense(2, 0).stats()["density"] == 0.0


@pytest.mark.parametrize("trial", range(6))
def test_union_and_intersection_match_python_sets(rng, trial):
    hk, n = 3, int(rng.integers(1, 200))
    a = kvsieve.Selection.from_heads(n, random_heads(rng, hk, n, rng.random()))
    b = kvsieve.Selection.from_heads(n, random_heads(rng, hk, n, rng.random()))
    u, i = a.union(b), a.intersection(b)
    for h in range(hk):
        sa, sb = set(a.head(h).tolist()), set(b.head(h).tolist())
        assert u.head(h).tolist() == sorted(sa | sb)
        assert i.head(h).tolist() == sorted(sa & sb)
    assert u.seq_len == n and i.num_kv_heads == hk
    assert a.union(a) == a and a.intersection(kvsieve.Selection.dense(hk, n)) == a
    assert a.union(kvsieve.Selection.dense(hk, n)).is_dense()


@pytest.mark.parametrize("n,sinks,window", [(0, 4, 8), (5, 4, 8), (12, 4, 8), (100, 4, 8), (100, 0, 1), (30, 40, 3)])
def test_streaming_and_lambda_mask(n, sinks, window):
    expect = sorted(set(range(min(sinks, n))) | set(range(max(n - window, 0), n)))
    s = kvsieve.streaming(2, n, sinks, window)
    assert heads_of(s) == [expect, expect] and s.seq_len == n
    lam = kvsieve.lambda_mask(3, n, global_=sinks, local=window)
    assert heads_of(lam) == [expect] * 3


def test_top_k_matches_numpy(rng):
    scores = rng.standard_normal(500).astype(np.float32)
    scores[rng.integers(0, 500, 40)] = 0.25  # ties go to the lower index
    scores[[3, 77]] = np.nan  # NaN ranks last
    for k in (0, 1, 17, 100, 498, 500, 900):
        got = kvsieve.top_k(scores, k)
        assert got.dtype == np.uint32
        key = np.where(np.isnan(scores), -np.inf, scores)
        order = sorted(range(500), key=lambda i: (-key[i], i))
        np.testing.assert_array_equal(got, sorted(order[:k]))
    np.testing.assert_array_equal(kvsieve.top_k(scores.astype(np.float16), 3), kvsieve.top_k(scores.astype(np.float16).astype(np.float32), 3))


@pytest.mark.parametrize("seq_len", [0, 1, 15, 16, 17, 64, 100, 333])
@pytest.mark.parametrize("sinks,window", [(0, 1), (4, 16), (5, 20), (64, 64)])
def test_window_pages_to_evict_matches_brute_force(seq_len, sinks, window):
    ps = 8
    expect = []
    for p in range(-(-seq_len // ps)):
        tokens = range(p * ps, min((p + 1) * ps, seq_len))
        if all(t >= sinks and t < seq_len - window for t in tokens):
            expect.append(p)
    got = kvsieve.window_pages_to_evict(seq_len, ps, sinks, window)
    assert got.dtype == np.int64
    assert got.tolist() == expect


def quest_reference(keys, q, page_size, budget, min_pages):
    """Per KV head, the tokens Quest page bounds keep (plain numpy)."""
    n, hk, _ = keys.shape
    group = q.shape[0] // hk
    num_pages = -(-n // page_size)
    if n <= budget:
        return [list(range(n))] * hk
    heads = []
    for h in range(hk):
        scores = []
        for p in range(num_pages):
            page = keys[p * page_size : (p + 1) * page_size, h].astype(np.float64)
            lo, hi = page.min(axis=0), page.max(axis=0)
            qg = q[h * group : (h + 1) * group].astype(np.float64)
            scores.append(max(np.maximum(qq * lo, qq * hi).sum() for qq in qg))
        order = sorted(range(num_pages), key=lambda p: (-scores[p], p))
        kept, count = [], 0
        for p in order:
            if count >= budget and len(kept) >= min(min_pages, num_pages):
                break
            kept.append(p)
            count += min(page_size, n - p * page_size)
        heads.append([t for p in sorted(kept) for t in range(p * page_size, min((p + 1) * page_size, n))])
    return heads


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("budget,min_pages", [(1, 0), (20, 0), (64, 0), (20, 9), (500, 0)])
def test_page_bounds_match_quest_reference(rng, group, budget, min_pages):
    hk, ps, n = 2, 8, 131
    c = kvsieve.KvCache(2, hk, D, ps, 40, dtype="f32")
    s = c.create_sequence()
    c.append(s, n)
    for layer in range(2):
        k = rng.standard_normal((n, hk, D)).astype(np.float32)
        c.write(s, layer, 0, k, k)
    q = rng.standard_normal((hk * group, D)).astype(np.float32)
    sel = kvsieve.page_bounds(c, s, 1, q, budget, min_pages=min_pages)
    assert sel.seq_len == n and sel.num_kv_heads == hk
    assert heads_of(sel) == quest_reference(c.read_keys(s, 1), q, ps, budget, min_pages)
    assert kvsieve.page_bounds(c, s, 1, q[None], budget, min_pages) == sel


def test_selections_are_usable_from_threads(rng):
    """A Selection is immutable and can be read from any thread."""
    import threading

    sel = kvsieve.Selection.from_heads(1000, random_heads(rng, 4, 1000, 0.3))
    other = kvsieve.Selection.from_heads(1000, random_heads(rng, 4, 1000, 0.3))
    expect = sel.union(other)
    results = []

    def work():
        for _ in range(50):
            results.append(sel.union(other) == expect)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and all(results)
