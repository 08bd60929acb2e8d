"""A policy with centroid retrieval (clusters=) through a ClusterIndexSet: the text form,
the set's build/update/staleness rule, and decode_with_policy equal to attention over
exactly retrieved ∪ sinks ∪ window ∪ not-yet-indexed tokens, against numpy."""

import numpy as np
import pytest

import kvsieve
import reference

D = 32
ATOL = 2e-4


def fill(rng, c, s, n, start=0):
    c.append(s, n)
    cfg = c.config
    for layer in range(cfg.num_layers):
        k = rng.standard_normal((n, cfg.num_kv_heads, D)).astype(np.float32) * 2
        v = rng.standard_normal((n, cfg.num_kv_heads, D)).astype(np.float32)
        c.write(s, layer, start, k, v)


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("sinks=4,window=64,clusters=512", "sinks=4,window=64,clusters=512"),
        (" hier=8 , clusters_k=100, clusters=256,window=32 ", "window=32,clusters=256,clusters_k=100,hier=8"),
        ("global=4,local=256,max_distance=256,clusters=1024,cluster_size=8", "sinks=4,window=256,clusters=1024,cluster_size=8,positions=capped,max_distance=256"),
    ],
)
def test_text_round_trip(text, canonical):
    p = kvsieve.Policy(text)
    assert str(p) == canonical and kvsieve.Policy(str(p)) == p


@pytest.mark.parametrize(
    "text,offset,words",
    [("clusters=x", 9, ["number", "clusters="]), ("clusters=4,clusters=8", 11, ["retrieval budget", "byte 0"]), ("dense,hier=2", 6, ["dense"])],
)
def test_parse_errors_carry_the_offset(text, offset, words):
    with pytest.raises(kvsieve.ParseError) as info:
        kvsieve.Policy(text)
    assert info.value.offset == offset
    for w in words:
        assert w in str(info.value)


def test_validate_errors_name_the_clause():
    with pytest.raises(kvsieve.InvalidArgumentError, match="only together with `clusters=`"):
        kvsieve.Policy("window=8,hier=4").validate(2, 2)
    with pytest.raises(kvsieve.InvalidArgumentError, match="not both"):
        kvsieve.Policy("clusters=8,clusters_k=4,cluster_size=2").validate(2, 2)
    with pytest.raises(kvsieve.InvalidArgumentError, match="every head of layer 1"):
        kvsieve.Policy("clusters=8;heads=1.1:clusters=16").validate(2, 2)


def union(*lists):
    return np.unique(np.concatenate([np.asarray(x, np.int64) for x in lists]))


@pytest.mark.parametrize("rank", ["estimate", "mixed"])
@pytest.mark.parametrize("hier", [None, 3])
@pytest.mark.parametrize("trial", range(3))
def test_decode_equals_reference_over_retrieved_sinks_window(rng, hier, trial, rank):
    n, grow, hk, g, layers = int(rng.integers(60, 220)), int(rng.integers(0, 30)), 2, 3, 2
    sinks, window, budget = int(rng.integers(0, 6)), int(rng.integers(4, 30)), int(rng.integers(8, 80))
    c = kvsieve.KvCache(layers, hk, D, 8, -(-(n + grow) // 8) + 2, dtype="f32")
    s = c.create_sequence()
    fill(rng, c, s, n)
    text = f"sinks={sinks},window={window},clusters={budget},cluster_size=8" + (f",hier={hier}" if hier else "") + f",rank={rank};layers=0:dense"
    policy = kvsieve.Policy(text)
    clusters = kvsieve.ClusterIndexSet(seed=trial)
    assert clusters.build(c, s, policy) == 1 and len(clusters) == 1 and clusters.keys() == [(s, 1)]
    assert clusters.get(s, 0) is None
    if grow:
        fill(rng, c, s, grow, start=n)
    total = n + grow
    index = clusters.get(s, 1)
    assert index.clustered_len == n - window
    q = rng.standard_normal((1, hk * g, D)).astype(np.float32)
    if hier:
        r, st = index.retrieve(q[0], budget=budget, seq_len=total, hierarchical=True, coarse_budget_multiple=2.0, rank=rank)
    else:
        r, st = index.retrieve(q[0], budget=budget, seq_len=total, rank=rank)
    win = kvsieve.streaming(hk, total, sinks, window)
    tail = np.arange(index.clustered_len, total)
    want = [union(r.head(h), win.head(h), tail) for h in range(hk)]
    out, lse, sels = c.decode_with_policy(1, [s], q, policy, clusters=clusters)
    for h in range(hk):
        np.testing.assert_array_equal(sels[0].head(h), want[h])
    ro, rl = reference.selected_attention(q, [total - 1], c.read_keys(s, 1), c.read_values(s, 1), want)
    np.testing.assert_allclose(out, ro, atol=ATOL)
    np.testing.assert_allclose(lse, rl, atol=ATOL)
    # What the retrieval read: centroid rows (fine scored, plus every coarse one under hier=)
    # and, for rank=mixed, one radius per fine cluster scored.
    out2, lse2, sels2, scored, radii = c.decode_with_clusters(1, [s], q, policy, clusters)
    np.testing.assert_array_equal(out2, out)
    fine = sum(st["clusters_scored"])
    assert scored == [fine + (hk * index.num_coarse_clusters if hier else 0)]
    assert radii == [fine if rank == "mixed" else 0]
    # After an update the index covers all but the window.
    if grow:
        assert clusters.update(c, s) == grow
        assert clusters.get(s, 1).clustered_len == total - window


def test_errors_name_what_to_call(rng):
    c = kvsieve.KvCache(1, 2, D, 8, 40, dtype="f32")
    s = c.create_sequence()
    fill(rng, c, s, 100)
    policy = kvsieve.Policy("sinks=2,window=8,clusters=16")
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    with pytest.raises(kvsieve.InvalidArgumentError, match="ClusterIndexSet"):
        c.decode_with_policy(0, [s], q, policy)
    clusters = kvsieve.ClusterIndexSet()
    with pytest.raises(kvsieve.InvalidArgumentError, match=f"a cluster index for sequence {s} at layer 0.*build the ClusterIndexSet"):
        c.decode_with_policy(0, [s], q, policy, clusters=clusters)
    clusters.build(c, s, policy)
    c.truncate(s, 50)
    with pytest.raises(kvsieve.InvalidArgumentError, match="build it again"):
        c.decode_with_policy(0, [s], q, policy, clusters=clusters)
    before = clusters.get(s, 0).clustered_len
    with pytest.raises(kvsieve.InvalidArgumentError, match="rebuild"):
        clusters.update(c, s)
    assert clusters.get(s, 0).clustered_len == before
    # A pre-RoPE cache's raw keys are scored for capped or contiguous positions only.
    pre = kvsieve.KvCache(1, 2, D, 8, 20, key_rope="pre", track_key_bounds=False)
    p = pre.create_sequence()
    fill(rng, pre, p, 30)
    assert clusters.build(pre, p, policy) == 1
    rope = kvsieve.RopeConfig(1000.0)
    with pytest.raises(kvsieve.InvalidArgumentError, match="capped or contiguous positions only"):
        pre.decode_with_policy(0, [p], q, policy, clusters=clusters, rope=rope)
    capped = kvsieve.Policy("global=2,local=8,max_distance=8,clusters=16")
    assert clusters.build(pre, p, capped) == 1
    out, lse, sels = pre.decode_with_policy(0, [p], q, capped, clusters=clusters, rope=rope)
    q_at_cap = kvsieve.apply_rope(q, [8], 1000.0)[0]
    r, _ = clusters.get(p, 0).retrieve(q_at_cap, budget=16, seq_len=30)
    win = kvsieve.streaming(2, 30, 2, 8)
    for h in range(2):
        np.testing.assert_array_equal(sels[0].head(h), union(r.head(h), win.head(h)))
    # Both caches' first sequence is 0: the pre-RoPE build replaced the other's index.
    assert clusters.remove_sequence(p) == 1 and len(clusters) == 0
    with pytest.raises(kvsieve.UnknownSequenceError):
        clusters.build(c, 999, policy)
