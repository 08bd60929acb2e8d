"""ClusterIndex (K-means over keys per KV head, centroid retrieval) against numpy
definitions: the clustering's bookkeeping and nearest-centroid assignment, the estimates
exp(q·C_c/√d) / Σ_j N_j exp(q·C_j/√d) averaged over a GQA group, threshold and budget
selection, hierarchical lookups, calibration, incremental assignment, save/load, bad input,
and decoding over a retrieved selection united with a window."""

import contextlib
import threading

import numpy as np
import pytest

import kvsieve
import reference

D = 64


def clustered_keys(rng, n, hk, d=D, centers=12, noise=0.3, dtype=np.float32):
    """Keys [n, hk, d] drawn around a few random directions per head, with varied norms."""
    out = np.empty((n, hk, d), np.float64)
    for h in range(hk):
        c = rng.standard_normal((centers, d)) * 2.0
        pick = rng.integers(0, centers, n)
        out[:, h] = c[pick] + noise * rng.standard_normal((n, d))
    return out.astype(dtype)


def unit(x):
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0.0)


def ref_estimates(q, index):
    """s[h][c] = mean over the group's query heads j of exp(q_j·C_c/√d) / Σ_i N_i exp(q_j·C_i/√d)."""
    q = np.asarray(q, np.float64).reshape(-1, index.head_dim)
    hk = index.num_kv_heads
    g = q.shape[0] // hk
    out = []
    for h in range(hk):
        C = index.centroids(h).astype(np.float64)
        N = index.sizes(h).astype(np.float64)
        s = np.zeros(len(N))
        for j in range(h * g, (h + 1) * g):
            lg = C @ q[j] / np.sqrt(index.head_dim)
            e = np.exp(lg - lg.max())
            s += e / (N * e).sum()
        out.append(s / g)
    return np.array(out)


def ref_rank(s):
    """Cluster ids by higher estimate first, lower id on ties."""
    return sorted(range(len(s)), key=lambda c: (-s[c], c))


def ref_budget(index, h, s, budget):
    left, kept = budget, []
    for c in ref_rank(s):
        if left == 0:
            break
        m = index.members(h, c)
        take = min(len(m), left)
        kept.extend(m[:take].tolist())
        left -= take
    return np.array(sorted(kept), np.uint32)


def ref_threshold(index, h, s, tau):
    kept = [index.members(h, c) for c in range(index.num_clusters) if s[c] > tau]
    return np.sort(np.concatenate(kept)).astype(np.uint32) if kept else np.zeros(0, np.uint32)


def fill_cache(rng, keys, dtype="f32", page_size=16, spare=4, layers=1):
    n, hk, d = keys.shape
    c = kvsieve.KvCache(layers, hk, d, page_size, -(-n // page_size) + spare, dtype=dtype)
    s = c.create_sequence()
    c.append(s, n)
    v = rng.standard_normal((n, hk, d)).astype(np.float32)
    for layer in range(layers):
        c.write(s, layer, 0, keys, v)
    return c, s


PROPERTIES = ["num_kv_heads", "head_dim", "num_clusters", "num_coarse_clusters", "seq_len_at_build", "seq_len", "clustered_len", "config"]
PER_HEAD = ["centroids", "centroids_normalized", "sizes", "member_offsets", "members", "assignment"]


def assert_same_index(a, b):
    """Equal options, sizes, per-head arrays, final inertia and coarse levels."""
    for name in PROPERTIES:
        assert getattr(a, name) == getattr(b, name), name
    for h in range(a.num_kv_heads):
        for m in PER_HEAD:
            np.testing.assert_array_equal(getattr(a, m)(h), getattr(b, m)(h), err_msg=f"{m}({h})")
        da, db = a.diagnostics(h), b.diagnostics(h)
        assert (da["inertia"], da["iterations"], da["converged"]) == (db["inertia"], db["iterations"], db["converged"])
        la, lb = a.coarse_level(h), b.coarse_level(h)
        assert (la is None) == (lb is None)
        for key in la or {}:
            np.testing.assert_array_equal(la[key], lb[key], err_msg=f"coarse {key}({h})")


def check_consistent(index, keys):
    """Sizes, CSR members, assignment and raw-mean centroids agree with each other and the keys."""
    m = index.clustered_len
    for h in range(index.num_kv_heads):
        sizes, off, mem, a = index.sizes(h), index.member_offsets(h), index.members(h), index.assignment(h)
        assert sizes.dtype == off.dtype == mem.dtype == a.dtype == np.uint32
        assert len(a) == m and len(mem) == m and off[0] == 0 and off[-1] == m
        np.testing.assert_array_equal(np.diff(off.astype(np.int64)), sizes)
        np.testing.assert_array_equal(np.bincount(a, minlength=index.num_clusters), sizes)
        assert np.all(sizes >= 1)
        np.testing.assert_array_equal(np.sort(mem), np.arange(m))
        for c in range(index.num_clusters):
            mc = index.members(h, c)
            np.testing.assert_array_equal(mc, mem[off[c] : off[c + 1]])
            assert np.all(np.diff(mc.astype(np.int64)) > 0)
            assert np.all(a[mc] == c)


# --- building and the clustering -------------------------------------------------------


@pytest.mark.parametrize("hk", [1, 3])
@pytest.mark.parametrize("clusters", [7, 0.1])
def test_build_bookkeeping_and_nearest_centroids(rng, hk, clusters):
    n = 300
    keys = clustered_keys(rng, n, hk)
    index = kvsieve.ClusterIndex.build(keys, clusters=clusters, max_iter=100, seed=5)
    k = clusters if isinstance(clusters, int) else round(clusters * n)
    assert (index.num_kv_heads, index.head_dim, index.num_clusters, index.num_coarse_clusters) == (hk, D, k, 0)
    assert index.seq_len == index.seq_len_at_build == index.clustered_len == n
    assert index.config == {"clusters": clusters, "coarse": None, "exclude_window": 0, "max_iter": 100, "seed": 5}
    assert index.coarse_level(0) is None
    check_consistent(index, keys)
    for h in range(hk):
        raw = keys[:, h].astype(np.float64)
        a = index.assignment(h)
        C = index.centroids(h)
        assert C.dtype == np.float32 and C.shape == (k, D)
        for c in range(k):
            np.testing.assert_allclose(C[c], raw[a == c].mean(axis=0), rtol=1e-4, atol=1e-4)
        diag = index.diagnostics(h)
        assert diag["converged"], diag
        assert len(diag["inertia_history"]) == diag["iterations"] + 1
        assert len(diag["seeds"]) == k
        # At convergence each key sits at a nearest unit centroid (cosine).
        U = index.centroids_normalized(h).astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, atol=1e-5)
        sim = unit(raw) @ U.T
        own = sim[np.arange(n), a]
        assert np.all(own >= sim.max(axis=1) - 1e-5)
        # The unit centroid is the normalised mean of its members' unit keys, and the
        # inertia is Σ ‖x̂ − ĉ‖².
        for c in range(k):
            np.testing.assert_allclose(U[c], unit(unit(raw[a == c]).mean(axis=0)), atol=1e-4)
        inertia = np.sum((unit(raw) - U[a]) ** 2)
        assert abs(inertia - diag["inertia"]) < 1e-3 * (1 + inertia)


def test_build_is_deterministic_and_seeded(rng):
    keys = clustered_keys(rng, 200, 2)
    a = kvsieve.ClusterIndex.build(keys, clusters=16, seed=1)
    b = kvsieve.ClusterIndex.build(keys, clusters=16, seed=1)
    c = kvsieve.ClusterIndex.build(keys, clusters=16, seed=2**64 - 1)
    for h in range(2):
        np.testing.assert_array_equal(a.assignment(h), b.assignment(h))
        np.testing.assert_array_equal(a.centroids(h), b.centroids(h))
    assert_same_index(a, b)
    assert c.config["seed"] == 2**64 - 1
    assert any(not np.array_equal(a.diagnostics(h)["seeds"], c.diagnostics(h)["seeds"]) for h in range(2))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_build_from_cache_equals_build_from_its_keys(rng, dtype):
    keys = clustered_keys(rng, 150, 2)
    c, s = fill_cache(rng, keys, dtype=dtype, layers=2)
    stored = c.read_keys(s, 1).astype(np.float32)
    a = kvsieve.ClusterIndex.build(cache=c, seq=s, layer=1, clusters=10, exclude_window=8, coarse=3)
    b = kvsieve.ClusterIndex.build(stored, clusters=10, exclude_window=8, coarse=3)
    assert a.clustered_len == 142 and a.seq_len == 150
    assert_same_index(a, b)


def test_exclude_window_and_fractions(rng):
    keys = clustered_keys(rng, 120, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=0.25, exclude_window=20, coarse=0.5)
    assert index.clustered_len == 100 and index.seq_len == 120
    assert index.num_clusters == 25 and index.num_coarse_clusters == 13  # 0.5 * 25 = 12.5 rounds half away from 0
    check_consistent(index, keys)
    assert all(index.assignment(h).shape == (100,) for h in range(2))


# --- estimates and selection -----------------------------------------------------------


@pytest.mark.parametrize("hk,group", [(1, 1), (2, 4), (4, 2)])
def test_estimates_match_numpy(rng, hk, group):
    keys = clustered_keys(rng, 256, hk)
    index = kvsieve.ClusterIndex.build(keys, clusters=20)
    q = (0.5 * rng.standard_normal((hk * group, D))).astype(np.float32)
    got = index.cluster_estimates(q)
    want = ref_estimates(q, index)
    assert got.dtype == np.float64 and got.shape == (hk, 20)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)
    # Σ_c N_c s_c = 1 per head.
    for h in range(hk):
        assert abs(float(got[h] @ index.sizes(h)) - 1.0) < 1e-5
    # A leading 1 and float16 queries are accepted.
    q16 = q.astype(np.float16)
    np.testing.assert_allclose(index.cluster_estimates(q16[None]), ref_estimates(q16, index), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("hk,group", [(2, 1), (2, 3)])
def test_threshold_and_budget_selection_match_numpy_ranking(rng, hk, group):
    n = 400
    keys = clustered_keys(rng, n, hk)
    index = kvsieve.ClusterIndex.build(keys, clusters=30, exclude_window=16)
    m = index.clustered_len
    hq = hk * group
    for trial in range(4):
        q = (0.3 * rng.standard_normal((hq, D)) + 0.3 * keys[rng.integers(n), np.arange(hq) // group]).astype(np.float32)
        s = index.cluster_estimates(q)
        np.testing.assert_allclose(s, ref_estimates(q, index), rtol=1e-4, atol=1e-12)
        for budget in [1, 37, 150, m, m + 50]:
            sel, st = index.retrieve(q, budget=budget)
            assert sel.num_kv_heads == hk and sel.seq_len == n
            assert st["centroid_evals"] == st["fine_evals"] == hq * 30 and st["coarse_evals"] == 0
            assert st["clusters_scored"] == [30] * hk and st["coarse_kept"] == [0] * hk
            assert st["tokens_kept"] == [min(budget, m)] * hk
            for h in range(hk):
                want = ref_budget(index, h, s[h], budget)
                np.testing.assert_array_equal(sel.head(h), want)
                # Robust to float ties: every wholly kept cluster scores (numpy) at least as
                # high as every cluster left out.
                a = index.assignment(h)
                counts = np.bincount(a[sel.head(h)], minlength=30)
                sizes = index.sizes(h)
                ref = ref_estimates(q, index)[h]
                full = [c for c in range(30) if counts[c] == sizes[c]]
                none = [c for c in range(30) if counts[c] == 0]
                if full and none:
                    assert min(ref[full]) >= max(ref[none]) * (1 - 1e-4)
                assert st["clusters_kept"][h] == int(np.sum(counts > 0))
        # Thresholds between distinct estimates, scalar and per head.
        taus = [np.quantile(s[h], 0.7) * 0.999 + np.quantile(s[h], 0.71) * 0.001 for h in range(hk)]
        tau = float(np.median(s))
        sel, st = index.retrieve(q, threshold=tau)
        for h in range(hk):
            np.testing.assert_array_equal(sel.head(h), ref_threshold(index, h, s[h], tau))
            assert st["tokens_kept"][h] == len(sel.head(h))
        for per_head in (taus, np.array(taus), tuple(taus)):
            sel, _ = index.retrieve(q, threshold=per_head)
            for h in range(hk):
                np.testing.assert_array_equal(sel.head(h), ref_threshold(index, h, s[h], taus[h]))
        # A negative threshold keeps every clustered token; a huge one none.
        sel, _ = index.retrieve(q, threshold=-1.0)
        assert all(np.array_equal(sel.head(h), np.arange(m)) for h in range(hk))
        sel, _ = index.retrieve(q, threshold=1e9)
        assert sel.is_empty()


@pytest.mark.parametrize("hk,group", [(1, 1), (2, 3)])
def test_mixed_rank_matches_numpy(rng, hk, group):
    n = 300
    keys = clustered_keys(rng, n, hk)
    index = kvsieve.ClusterIndex.build(keys, clusters=25)
    hq = hk * group
    for h in range(hk):
        a, cents = index.assignment(h), index.centroids(h).astype(np.float64)
        dist = np.linalg.norm(keys[:, h].astype(np.float64) - cents[a], axis=1)
        want = np.array([dist[a == c].max() for c in range(25)])
        np.testing.assert_allclose(index.radii(h), want, rtol=1e-5, atol=1e-6)
    q = (0.6 * rng.standard_normal((hq, D))).astype(np.float32)
    s = index.cluster_estimates(q)
    for budget in [1, 40, 200, n + 5]:
        sel, st = index.retrieve(q, budget=budget, rank="mixed")
        assert st["tokens_kept"] == [min(budget, n)] * hk
        for h in range(hk):
            qh = q[h * group:(h + 1) * group].astype(np.float64)
            cents = index.centroids(h).astype(np.float64)
            bound = ((qh @ cents.T) + np.linalg.norm(qh, axis=1)[:, None] * index.radii(h)[None].astype(np.float64)).max(axis=0) / np.sqrt(D)
            # Alternately the best cluster not yet taken by estimate, then by bound.
            rankings, order = [ref_rank(s[h]), ref_rank(bound)], []
            while len(order) < 25:
                for r in rankings:
                    rest = [c for c in r if c not in order]
                    if rest:
                        order.append(rest[0])
            out, left = [], budget
            for c in order:
                take = min(left, int(index.sizes(h)[c]))
                out.extend(index.members(h, int(c))[:take])
                left -= take
            np.testing.assert_array_equal(sel.head(h), np.sort(np.array(out, np.uint32)))
    # Through a policy: rank=mixed is accepted and printed back.
    p = kvsieve.Policy.parse("sinks=4,window=16,clusters=64,rank=mixed")
    assert "rank=mixed" in str(p)
    with pytest.raises(kvsieve.InvalidArgumentError, match="rank"):
        index.retrieve(q, threshold=0.1, rank="mixed")
    with pytest.raises(kvsieve.InvalidArgumentError, match="rank"):
        index.retrieve(q, budget=4, rank="best")


def test_retrieve_seq_len_and_window_union(rng):
    n, hk, window = 200, 2, 24
    keys = clustered_keys(rng, n, hk)
    index = kvsieve.ClusterIndex.build(keys, clusters=16, exclude_window=window)
    q = rng.standard_normal((hk * 2, D)).astype(np.float32)
    sel, _ = index.retrieve(q, budget=40)
    assert sel.seq_len == n
    assert all(np.all(sel.head(h) < n - window) for h in range(hk))
    both = sel.union(kvsieve.streaming(hk, n, 4, window))
    for h in range(hk):
        want = np.union1d(np.union1d(sel.head(h), np.arange(4)), np.arange(n - window, n)).astype(np.uint32)
        np.testing.assert_array_equal(both.head(h), want)
    # For a longer sequence (tokens appended since), the clusters' tokens stay the same.
    longer, _ = index.retrieve(q, budget=40, seq_len=n + 10)
    assert longer.seq_len == n + 10
    assert all(np.array_equal(longer.head(h), sel.head(h)) for h in range(hk))


@pytest.mark.parametrize("cache_dtype", ["f32", "f16"])
def test_decode_over_retrieved_selection_matches_reference(rng, cache_dtype):
    """Retrieval from a cache's keys, united with sinks + a window, then decode_sparse: the
    output is attention over exactly those tokens."""
    n, hk, group, window = 180, 2, 2, 16
    keys = clustered_keys(rng, n, hk)
    c, s = fill_cache(rng, keys, dtype=cache_dtype)
    index = kvsieve.ClusterIndex.build(cache=c, seq=s, layer=0, clusters=0.1, exclude_window=window, coarse=4)
    q = (0.2 * rng.standard_normal((1, hk * group, D))).astype(np.float32)
    for sel, _ in [
        index.retrieve(q, budget=50),
        index.retrieve(q[0], threshold=index.calibrate(q, 0.3)),
        index.retrieve(q, budget=50, hierarchical=True, coarse_budget_multiple=2.0),
    ]:
        sel = sel.union(kvsieve.streaming(hk, c.seq_len(s), 2, window))
        out, lse = c.decode_sparse(0, [s], q, [sel])
        heads = [sel.head(h) for h in range(hk)]
        ro, rl = reference.selected_attention(q, [n - 1], c.read_keys(s, 0), c.read_values(s, 0), heads)
        np.testing.assert_allclose(out[0], ro[0], atol=2e-3 if cache_dtype == "f16" else 1e-4)
        np.testing.assert_allclose(lse[0], rl[0], atol=2e-3 if cache_dtype == "f16" else 1e-4)


# --- hierarchical ----------------------------------------------------------------------


def test_coarse_level_and_hierarchical_lookups(rng):
    n, hk, group, k, k1 = 600, 2, 2, 60, 8
    keys = clustered_keys(rng, n, hk, centers=20)
    index = kvsieve.ClusterIndex.build(keys, clusters=k, coarse=k1)
    hq = hk * group
    for h in range(hk):
        lvl = index.coarse_level(h)
        assert lvl["centroids"].shape == (k1, D) and lvl["sizes"].dtype == np.uint32
        off, kids = lvl["child_offsets"], lvl["children"]
        np.testing.assert_array_equal(np.sort(kids), np.arange(k))
        sizes = index.sizes(h).astype(np.float64)
        C = index.centroids(h).astype(np.float64)
        for c1 in range(k1):
            ch = kids[off[c1] : off[c1 + 1]]
            assert len(ch) >= 1
            assert lvl["sizes"][c1] == sizes[ch].sum()
            want = (sizes[ch, None] * C[ch]).sum(axis=0) / sizes[ch].sum()
            np.testing.assert_allclose(lvl["centroids"][c1], want, rtol=1e-4, atol=1e-4)
    q = (0.3 * rng.standard_normal((hq, D))).astype(np.float32)
    # Opening every coarse cluster gives the flat result, at the cost of both levels.
    for fine in [dict(budget=100), dict(threshold=float(np.median(index.cluster_estimates(q))))]:
        flat, fs = index.retrieve(q, **fine)
        hier, hs = index.retrieve(q, hierarchical=True, coarse_threshold=-1.0, **fine)
        assert hier == flat
        assert hs["coarse_evals"] == hq * k1 and hs["fine_evals"] == hq * k
        assert hs["centroid_evals"] == hq * (k + k1) and hs["coarse_kept"] == [k1] * hk
        assert fs["centroid_evals"] == hq * k
    # A small coarse budget scores fewer centroids than the flat lookup.
    sel, st = index.retrieve(q, budget=60, hierarchical=True, coarse_budget=60)
    assert st["centroid_evals"] == st["coarse_evals"] + st["fine_evals"] < hq * k
    assert st["fine_evals"] == group * sum(st["clusters_scored"])
    assert st["tokens_kept"] == [60] * hk and len(sel) == 60 * hk
    # The opened coarse clusters hold at least the budget, and only their children are kept.
    for h in range(hk):
        lvl = index.coarse_level(h)
        a = index.assignment(h)
        kept_clusters = set(a[sel.head(h)].tolist())
        assert len(kept_clusters) == st["clusters_kept"][h]
        assert st["clusters_scored"][h] < k
    sel2, st2 = index.retrieve(q, budget=60, hierarchical=True, coarse_budget_multiple=1.0)
    assert sel2 == sel and st2 == st


# --- calibration -----------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_calibration_hits_the_target_fraction(rng, per_head):
    n, hk, group = 1500, 2, 2
    keys = clustered_keys(rng, n, hk, centers=40, noise=0.5)
    index = kvsieve.ClusterIndex.build(keys, clusters=150)
    hq = hk * group
    queries = (0.3 * rng.standard_normal((24, hq, D))).astype(np.float32)
    for target in [0.05, 0.2, 0.5]:
        th = index.calibrate(queries, target, per_head=per_head)
        assert isinstance(th, kvsieve.ClusterThresholds)
        assert th.target == target and th.per_head_mode == per_head and len(th) == hk
        assert th.per_head.dtype == np.float64 and th.kept_fraction.shape == (hk,)
        if not per_head:
            assert np.all(th.per_head == th.per_head[0])
        assert abs(th.mean_kept_fraction() - target) < 0.02, (target, th)
        # The fractions it reports are what retrieval keeps on the calibration queries.
        kept = np.zeros(hk)
        for q in queries:
            _, st = index.retrieve(q, threshold=th)
            kept += np.array(st["tokens_kept"]) / n
        kept /= len(queries)
        np.testing.assert_allclose(kept, th.kept_fraction, atol=1e-9)
        # Numpy: the kept fraction of τ from the reference estimates.
        fr = np.zeros(hk)
        for q in queries:
            s = ref_estimates(q, index)
            for h in range(hk):
                fr[h] += index.sizes(h)[s[h] > th.per_head[h]].sum() / n
        np.testing.assert_allclose(fr / len(queries), th.kept_fraction, atol=0.01)
        if per_head:
            assert np.all(np.abs(th.kept_fraction - target) < 0.03)
    # target 1 keeps everything.
    th = index.calibrate(queries, 1.0)
    assert np.all(th.per_head == -1.0) and np.allclose(th.kept_fraction, 1.0)


# --- incremental assignment and rebuild --------------------------------------------------


@pytest.mark.parametrize("coarse", [None, 4])
def test_assign_new_matches_nearest_centroid(rng, coarse):
    n0, extra, hk, window = 160, 70, 2, 8
    keys = clustered_keys(rng, n0 + extra, hk)
    c, s = fill_cache(rng, keys[:n0], spare=8)
    index = kvsieve.ClusterIndex.build(cache=c, seq=s, layer=0, clusters=12, exclude_window=window, coarse=coarse)
    before = {h: (index.centroids(h), index.centroids_normalized(h), index.assignment(h)) for h in range(hk)}
    assert index.assign_new(cache=c, seq=s, layer=0) == 0
    c.append(s, extra)
    v = rng.standard_normal((extra, hk, D)).astype(np.float32)
    c.write(s, 0, n0, keys[n0:], v)
    n = n0 + extra
    assert index.assign_new(cache=c, seq=s, layer=0) == extra
    assert index.seq_len == n and index.seq_len_at_build == n0 and index.clustered_len == n - window
    check_consistent(index, keys)
    for h in range(hk):
        C, U, a0 = before[h]
        np.testing.assert_array_equal(index.centroids(h), C)
        np.testing.assert_array_equal(index.centroids_normalized(h), U)
        a = index.assignment(h)
        np.testing.assert_array_equal(a[: n0 - window], a0)
        new = unit(keys[n0 - window : n - window, h]) @ U.astype(np.float64).T
        own = new[np.arange(len(new)), a[n0 - window :]]
        assert np.all(own >= new.max(axis=1) - 1e-5)
        if coarse:
            lvl = index.coarse_level(h)
            sizes = index.sizes(h)
            for c1 in range(coarse):
                ch = lvl["children"][lvl["child_offsets"][c1] : lvl["child_offsets"][c1 + 1]]
                assert lvl["sizes"][c1] == sizes[ch].sum()
    # Array sources work the same.
    other = kvsieve.ClusterIndex.build(keys[:n0], clusters=12, exclude_window=window, coarse=coarse)
    assert other.assign_new(keys) == extra
    for h in range(hk):
        np.testing.assert_array_equal(other.assignment(h), index.assignment(h))
    # rebuild clusters everything again from scratch.
    index.rebuild(cache=c, seq=s, layer=0)
    fresh = kvsieve.ClusterIndex.build(keys, clusters=12, exclude_window=window, coarse=coarse)
    assert index.seq_len_at_build == n
    assert_same_index(index, fresh)


# --- save and load ---------------------------------------------------------------------


@pytest.mark.parametrize("coarse", [None, 0.3])
def test_save_load_round_trip(rng, tmp_path, coarse):
    keys = clustered_keys(rng, 220, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=20, exclude_window=10, coarse=coarse, seed=9)
    path = tmp_path / "index.safetensors"
    index.save(path)
    for loaded in [kvsieve.ClusterIndex.load(path), kvsieve.ClusterIndex.load(str(path)), kvsieve.ClusterIndex.from_bytes(path.read_bytes())]:
        assert_same_index(loaded, index)
        if coarse is None:
            assert loaded.coarse_level(0) is None
        q = rng.standard_normal((4, D)).astype(np.float32)
        assert loaded.retrieve(q, budget=33) == index.retrieve(q, budget=33)
        assert_same_index(kvsieve.ClusterIndex.from_bytes(loaded.to_bytes()), index)
    # load_for checks the index against the keys.
    assert_same_index(kvsieve.ClusterIndex.load_for(path, keys), index)
    c, s = fill_cache(rng, keys)
    kvsieve.ClusterIndex.load_for(path, cache=c, seq=s, layer=0)
    with pytest.raises(kvsieve.IoError, match="head_dim"):
        kvsieve.ClusterIndex.load_for(path, np.zeros((220, 2, 32), np.float32))
    with pytest.raises(kvsieve.IoError, match="covers 220 tokens"):
        kvsieve.ClusterIndex.load_for(path, keys[:100])


def test_corrupted_or_truncated_files_raise_io_error(rng, tmp_path):
    keys = clustered_keys(rng, 100, 2)
    data = kvsieve.ClusterIndex.build(keys, clusters=8, coarse=2).to_bytes()
    path = tmp_path / "bad.safetensors"
    for cut in [0, 7, 8, 100, len(data) // 2, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(kvsieve.IoError) as info:
            kvsieve.ClusterIndex.load(path)
        assert str(path) in str(info.value)
        with pytest.raises(kvsieve.IoError):
            kvsieve.ClusterIndex.from_bytes(data[:cut])
    # A flipped byte anywhere in the tensor data fails the checksum (or an invariant).
    header = int.from_bytes(data[:8], "little") + 8
    for pos in rng.integers(header, len(data), 20):
        bad = bytearray(data)
        bad[pos] ^= 0x41
        with pytest.raises(kvsieve.IoError):
            kvsieve.ClusterIndex.from_bytes(bytes(bad))
    path.write_bytes(data + b"\0" * 16)
    with pytest.raises(kvsieve.IoError):
        kvsieve.ClusterIndex.load(path)
    with pytest.raises(kvsieve.IoError):
        kvsieve.ClusterIndex.load(tmp_path / "missing.safetensors")
    with pytest.raises(kvsieve.IoError):
        kvsieve.ClusterIndex.load(tmp_path)
    with pytest.raises(kvsieve.IoError):
        kvsieve.ClusterIndex.build(keys, clusters=8).save(tmp_path / "no" / "such" / "dir.safetensors")


# --- threads ---------------------------------------------------------------------------


def test_concurrent_lookups_share_the_index(rng):
    keys = clustered_keys(rng, 500, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=40, coarse=6)
    qs = (0.3 * rng.standard_normal((8, 4, D))).astype(np.float32)
    want = [index.retrieve(q, budget=64) for q in qs]
    got = [None] * len(qs)

    def work(i):
        for _ in range(20):
            got[i] = index.retrieve(qs[i], budget=64)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


# --- errors ----------------------------------------------------------------------------


@contextlib.contextmanager
def expect(cls, *words):
    """Expect the KvsieveError subclass `cls`, its message containing every word."""
    with pytest.raises(cls) as info:
        yield info
    assert isinstance(info.value, kvsieve.KvsieveError)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_build_errors(rng):
    keys = clustered_keys(rng, 50, 2)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "at least 1"):
        kvsieve.ClusterIndex.build(keys, clusters=0)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "at most one cluster per key"):
        kvsieve.ClusterIndex.build(keys, clusters=51)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "(0, 1]"):
        kvsieve.ClusterIndex.build(keys, clusters=1.5)
    with expect(kvsieve.InvalidArgumentError, "`clusters`"):
        kvsieve.ClusterIndex.build(keys, clusters=0.001)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "at most one cluster per key (40 keys)"):
        kvsieve.ClusterIndex.build(keys, clusters=41, exclude_window=10)
    with expect(kvsieve.OutOfRangeError, "`clusters`"):
        kvsieve.ClusterIndex.build(keys, clusters=-3)
    with expect(kvsieve.DTypeError, "`clusters`"):
        kvsieve.ClusterIndex.build(keys, clusters="8")
    with expect(kvsieve.DTypeError, "`clusters`"):
        kvsieve.ClusterIndex.build(keys, clusters=True)
    with expect(kvsieve.InvalidArgumentError, "`coarse`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, coarse=9)
    with expect(kvsieve.InvalidArgumentError, "`coarse`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, coarse=0)
    with expect(kvsieve.InvalidArgumentError, "`exclude_window`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, exclude_window=50)
    with expect(kvsieve.OutOfRangeError, "`seed`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, seed=-1)
    with expect(kvsieve.OutOfRangeError, "`seed`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, seed=2**64)
    with expect(kvsieve.OutOfRangeError, "`max_iter`"):
        kvsieve.ClusterIndex.build(keys, clusters=8, max_iter=-1)
    bad = keys.copy()
    bad[17, 1, 5] = np.nan
    with expect(kvsieve.InvalidArgumentError, "`keys`", "token 17, KV head 1"):
        kvsieve.ClusterIndex.build(bad, clusters=8)
    bad[17, 1, 5] = np.inf
    with expect(kvsieve.InvalidArgumentError, "`keys`", "token 17"):
        kvsieve.ClusterIndex.build(bad, clusters=8)
    # Empty contexts: an empty array, an empty sequence.
    with expect(kvsieve.InvalidArgumentError, "`keys`", "empty"):
        kvsieve.ClusterIndex.build(np.zeros((0, 2, D), np.float32), clusters=1)
    c = kvsieve.KvCache(1, 2, D, 16, 4, dtype="f32")
    s = c.create_sequence()
    with expect(kvsieve.InvalidArgumentError, "`seq`", "empty"):
        kvsieve.ClusterIndex.build(cache=c, seq=s, layer=0, clusters=1)
    # Key sources.
    with expect(kvsieve.InvalidArgumentError, "`keys`"):
        kvsieve.ClusterIndex.build(clusters=1)
    with expect(kvsieve.InvalidArgumentError, "`cache`"):
        kvsieve.ClusterIndex.build(keys, cache=c, seq=s, layer=0, clusters=1)
    with expect(kvsieve.InvalidArgumentError, "`layer`"):
        kvsieve.ClusterIndex.build(cache=c, seq=s, clusters=1)
    with expect(kvsieve.UnknownSequenceError):
        kvsieve.ClusterIndex.build(cache=c, seq=99, layer=0, clusters=1)
    pre = kvsieve.KvCache(1, 2, D, 16, 4, dtype="f32", key_rope="pre")
    ps = pre.create_sequence()
    pre.append(ps, 4)
    with expect(kvsieve.InvalidArgumentError, "`cache`", "post"):
        kvsieve.ClusterIndex.build(cache=pre, seq=ps, layer=0, clusters=1)
    with expect(kvsieve.ShapeError, "`keys`"):
        kvsieve.ClusterIndex.build(np.zeros((4, D), np.float32), clusters=1)
    with expect(kvsieve.UnsupportedError, "head_dim 12"):
        kvsieve.ClusterIndex.build(np.ones((4, 2, 12), np.float32), clusters=1)
    with expect(kvsieve.DTypeError, "`keys`"):
        kvsieve.ClusterIndex.build(keys.astype(np.int32), clusters=1)


def test_retrieve_and_calibrate_errors(rng):
    keys = clustered_keys(rng, 80, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=8)
    hier = kvsieve.ClusterIndex.build(keys, clusters=8, coarse=2)
    q = rng.standard_normal((4, D)).astype(np.float32)
    with expect(kvsieve.InvalidArgumentError, "`budget`", "at least 1"):
        index.retrieve(q, budget=0)
    with expect(kvsieve.OutOfRangeError, "`budget`"):
        index.retrieve(q, budget=-2)
    with expect(kvsieve.InvalidArgumentError, "`threshold`", "neither"):
        index.retrieve(q)
    with expect(kvsieve.InvalidArgumentError, "`budget`"):
        index.retrieve(q, threshold=0.1, budget=5)
    with expect(kvsieve.InvalidArgumentError, "`threshold`", "NaN"):
        index.retrieve(q, threshold=float("nan"))
    with expect(kvsieve.InvalidArgumentError, "`threshold[1]`", "NaN"):
        index.retrieve(q, threshold=[0.1, float("nan")])
    with expect(kvsieve.ShapeError, "`threshold`", "[2]"):
        index.retrieve(q, threshold=[0.1, 0.2, 0.3])
    with expect(kvsieve.DTypeError, "`threshold`"):
        index.retrieve(q, threshold="high")
    # The query against the index: head_dim, number of heads, finite values, dtype.
    with expect(kvsieve.ShapeError, "`q`", "head_dim 64"):
        index.retrieve(rng.standard_normal((4, 32)).astype(np.float32), budget=4)
    with expect(kvsieve.ShapeError, "`q`", "multiple of num_kv_heads 2"):
        index.retrieve(rng.standard_normal((3, D)).astype(np.float32), budget=4)
    with expect(kvsieve.ShapeError, "`q`"):
        index.cluster_estimates(rng.standard_normal((2, 4, D)).astype(np.float32))
    bad = q.copy()
    bad[1, 3] = np.nan
    with expect(kvsieve.InvalidArgumentError, "`q`", "finite"):
        index.retrieve(bad, budget=4)
    with expect(kvsieve.DTypeError, "`q`"):
        index.retrieve(q.astype(np.complex64), budget=4)
    with expect(kvsieve.OutOfRangeError, "`seq_len`"):
        index.retrieve(q, budget=4, seq_len=79)
    # Hierarchical rules.
    with expect(kvsieve.InvalidArgumentError, "`hierarchical`", "coarse level"):
        index.retrieve(q, budget=4, hierarchical=True, coarse_budget=10)
    with expect(kvsieve.InvalidArgumentError, "`coarse_budget`", "hierarchical=True"):
        hier.retrieve(q, budget=4, coarse_budget=10)
    with expect(kvsieve.InvalidArgumentError, "`hierarchical`", "coarse rule"):
        hier.retrieve(q, budget=4, hierarchical=True)
    with expect(kvsieve.InvalidArgumentError, "`coarse_budget`"):
        hier.retrieve(q, budget=4, hierarchical=True, coarse_threshold=0.1, coarse_budget=3)
    with expect(kvsieve.InvalidArgumentError, "`coarse_budget`", "at least 1"):
        hier.retrieve(q, budget=4, hierarchical=True, coarse_budget=0)
    with expect(kvsieve.InvalidArgumentError, "`coarse_threshold`", "NaN"):
        hier.retrieve(q, budget=4, hierarchical=True, coarse_threshold=float("nan"))
    with expect(kvsieve.InvalidArgumentError, "`coarse_budget_multiple`", "positive"):
        hier.retrieve(q, budget=4, hierarchical=True, coarse_budget_multiple=0.0)
    with expect(kvsieve.InvalidArgumentError, "`coarse_budget_multiple`", "budget"):
        hier.retrieve(q, threshold=0.0, hierarchical=True, coarse_budget_multiple=2.0)
    # Calibration.
    qs = rng.standard_normal((5, 4, D)).astype(np.float32)
    for bad_target in [0.0, -0.1, 1.5, float("nan")]:
        with expect(kvsieve.InvalidArgumentError, "`target_fraction`"):
            index.calibrate(qs, bad_target)
    with expect(kvsieve.ShapeError, "`queries`"):
        index.calibrate(qs[0], 0.2)
    with expect(kvsieve.ShapeError, "`queries`"):
        index.calibrate(qs[:0], 0.2)
    with expect(kvsieve.ShapeError, "`queries`"):
        index.calibrate(rng.standard_normal((5, 4, 32)).astype(np.float32), 0.2)
    with expect(kvsieve.ShapeError, "`queries`"):
        index.calibrate(rng.standard_normal((5, 3, D)).astype(np.float32), 0.2)
    # Inspection indices.
    for method in [index.centroids, index.sizes, index.assignment, index.diagnostics, index.coarse_level]:
        with expect(kvsieve.OutOfRangeError, "`h`"):
            method(2)
        with expect(kvsieve.OutOfRangeError, "`h`"):
            method(-1)
    with expect(kvsieve.OutOfRangeError, "`c`"):
        index.members(0, 8)


def test_assign_new_and_rebuild_errors(rng):
    keys = clustered_keys(rng, 80, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=8)
    snapshot = kvsieve.ClusterIndex.from_bytes(index.to_bytes())
    with expect(kvsieve.ShapeError, "`keys`", "head_dim 64"):
        index.assign_new(np.ones((90, 2, 32), np.float32))
    with expect(kvsieve.ShapeError, "`keys`", "num_kv_heads 2"):
        index.assign_new(np.ones((90, 4, D), np.float32))
    with expect(kvsieve.InvalidArgumentError, "`keys`", "80 tokens"):
        index.assign_new(keys[:60])
    more = np.concatenate([keys, keys[:10]])
    more[85, 0, 0] = np.nan
    with expect(kvsieve.InvalidArgumentError, "`keys`", "token 85"):
        index.assign_new(more)
    with expect(kvsieve.ShapeError, "`keys`"):
        index.rebuild(np.ones((90, 2, 32), np.float32))
    with expect(kvsieve.InvalidArgumentError, "`keys`", "80 tokens", "rebuild"):
        index.rebuild(keys[:79])
    c = kvsieve.KvCache(1, 4, D, 16, 8, dtype="f32")
    s = c.create_sequence()
    c.append(s, 90)
    with expect(kvsieve.ShapeError, "`cache`", "num_kv_heads 4"):
        index.assign_new(cache=c, seq=s, layer=0)
    with expect(kvsieve.InvalidArgumentError, "`keys`"):
        index.assign_new()
    # A failed call changed nothing.
    assert_same_index(index, snapshot)
    with expect(kvsieve.DTypeError, "`path`"):
        index.save(3)
    with expect(kvsieve.DTypeError, "`data`"):
        kvsieve.ClusterIndex.from_bytes("not bytes")


def test_threshold_argument_forms(rng):
    keys = clustered_keys(rng, 120, 2)
    index = kvsieve.ClusterIndex.build(keys, clusters=10)
    q = rng.standard_normal((2, D)).astype(np.float32)
    s = index.cluster_estimates(q)
    tau = float(np.median(s))
    want, _ = index.retrieve(q, threshold=tau)
    for form in [np.float32(tau), np.float64(tau), np.array(tau)]:
        got, _ = index.retrieve(q, threshold=form)
        # float32 rounding may move tau past an estimate: compare against the same tau.
        assert got == index.retrieve(q, threshold=float(form))[0]
    assert index.retrieve(q, threshold=0)[0] == index.retrieve(q, threshold=0.0)[0]
    assert want == index.retrieve(q, threshold=[tau, tau])[0] == index.retrieve(q, threshold=np.array([tau, tau]))[0]
    with expect(kvsieve.ShapeError, "`threshold`"):
        index.retrieve(q, threshold=np.full((2, 1), tau))
    with expect(kvsieve.DTypeError, "`threshold`"):
        index.retrieve(q, threshold=True)
    with expect(kvsieve.DTypeError, "`threshold`"):
        index.retrieve(q, threshold=["a", "b"])


# --- one head's K-means ----------------------------------------------------------------


def ref_lloyd(x, init, max_iter):
    """Spherical Lloyd from unit centroids `init` (no empty cluster may arise): assign by the
    largest x̂·ĉ (ties to the lower index), update ĉ to the normalised mean of the members'
    x̂, stop when an assignment changes nothing. Returns (assignment, iterations)."""
    xu = unit(x)
    c = unit(init)
    a = np.argmax(xu @ c.T, axis=1)
    for it in range(1, max_iter + 1):
        assert len(np.unique(a)) == len(c), "an empty cluster: the reference does not repair"
        c = unit(np.stack([xu[a == j].mean(axis=0) for j in range(len(c))]))
        b = np.argmax(xu @ c.T, axis=1)
        if np.array_equal(a, b):
            return a, it
        a = b
    return a, max_iter


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kmeans_matches_numpy_lloyd_and_the_index(rng, dtype):
    n, k = 400, 10
    centers = 2.0 * rng.standard_normal((k, D))
    x = (centers[np.arange(n) % k] + 0.5 * rng.standard_normal((n, D))).astype(dtype)
    init = (centers + 0.5 * rng.standard_normal((k, D))).astype(np.float32)
    got = kvsieve.kmeans(x, init=init, max_iter=50)
    a, iters = ref_lloyd(x.astype(np.float64), init.astype(np.float64), 50)
    np.testing.assert_array_equal(got["assignment"], a)
    assert got["iterations"] == iters and got["converged"]
    assert len(got["seeds"]) == 0
    assert got["centroids"].shape == (k, D) and got["sizes"].sum() == n
    for c in range(k):
        np.testing.assert_allclose(got["centroids"][c], x[a == c].astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-4)
    # From k-means++ seeds: the same seeds as kmeans_seeds, and the same clustering as the
    # index's one head.
    res = kvsieve.kmeans(x, 0.05, max_iter=30, seed=7)
    seeds = kvsieve.kmeans_seeds(x, 20, seed=7)
    assert seeds.dtype == np.uint32 and len(set(seeds.tolist())) == 20 and seeds.max() < n
    np.testing.assert_array_equal(res["seeds"], seeds)
    index = kvsieve.ClusterIndex.build(x[:, None, :], clusters=20, max_iter=30, seed=7)
    np.testing.assert_array_equal(res["assignment"], index.assignment(0))
    np.testing.assert_array_equal(res["centroids"], index.centroids(0))
    np.testing.assert_array_equal(res["members"], index.members(0))
    assert res["inertia"] == index.diagnostics(0)["inertia"]
    assert res["inertia_history"] == index.diagnostics(0)["inertia_history"]
    # Lloyd never raises the inertia.
    h = res["inertia_history"]
    assert all(b <= a + 1e-5 * (1 + a) for a, b in zip(h, h[1:]))
    assert not np.array_equal(kvsieve.kmeans_seeds(x, 20, seed=8), seeds)


def test_kmeans_errors(rng):
    x = rng.standard_normal((30, D)).astype(np.float32)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "neither"):
        kvsieve.kmeans(x)
    with expect(kvsieve.InvalidArgumentError, "`init`"):
        kvsieve.kmeans(x, 3, init=x[:3])
    with expect(kvsieve.InvalidArgumentError, "`clusters`"):
        kvsieve.kmeans(x, 0)
    with expect(kvsieve.InvalidArgumentError, "`clusters`"):
        kvsieve.kmeans(x, 31)
    with expect(kvsieve.InvalidArgumentError, "`clusters`", "empty"):
        kvsieve.kmeans(x[:0], 1)
    with expect(kvsieve.ShapeError, "`keys`"):
        kvsieve.kmeans(x[None], 3)
    with expect(kvsieve.ShapeError, "`init`"):
        kvsieve.kmeans(x, init=x[:3, :32])
    with expect(kvsieve.ShapeError, "`init`"):
        kvsieve.kmeans(x, init=x[0])
    with expect(kvsieve.InvalidArgumentError, "`init`"):
        kvsieve.kmeans(x[:2], init=x[:3])
    bad = x.copy()
    bad[4, 9] = np.nan
    with expect(kvsieve.InvalidArgumentError, "`keys`", "key 4"):
        kvsieve.kmeans(bad, 3)
    with expect(kvsieve.InvalidArgumentError, "`init`", "centroid 1"):
        kvsieve.kmeans(x, init=bad[3:6])
    with expect(kvsieve.UnsupportedError):
        kvsieve.kmeans(np.ones((5, 12), np.float32), 2)
    with expect(kvsieve.OutOfRangeError, "`seed`"):
        kvsieve.kmeans(x, 2, seed=-5)
    with expect(kvsieve.InvalidArgumentError, "`k`"):
        kvsieve.kmeans_seeds(x, 0)
    with expect(kvsieve.InvalidArgumentError, "`k`"):
        kvsieve.kmeans_seeds(x, 31)
