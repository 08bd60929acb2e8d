"""Policy from Python: text form, validation, select, policy-driven decode / prefill, and a
long stream under sinks + window with eviction keeping memory bounded."""

import numpy as np
import pytest

import kvsieve
import reference

D = 64
ATOL = 2e-4
ROPE_ATOL = 1e-3
THETA = 10000.0


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("", "dense"),
        ("dense", "dense"),
        (" global=4 , local=4096,max_distance=4096 ", "sinks=4,window=4096,positions=capped,max_distance=4096"),
        ("layers=3,0-1,2:dense;window=8,sinks=2", "sinks=2,window=8;layers=0-3:dense"),
        ("positions=contiguous,window=8,sinks=4", "sinks=4,window=8,positions=contiguous"),
        (
            "window=512;layers=0-1,30-31:dense;heads=5.1,2.0:pages=4096,min_pages=2",
            "window=512;layers=0-1,30-31:dense;heads=2.0,5.1:pages=4096,min_pages=2",
        ),
        ("sinks=4,window=1024,pages=2048;layers=0-1:dense", "sinks=4,window=1024,pages=2048;layers=0-1:dense"),
    ],
)
def test_parse_and_canonical_text_round_trip(text, canonical):
    p = kvsieve.Policy(text)
    assert str(p) == canonical
    again = kvsieve.Policy.parse(str(p))
    assert again == p and hash(again) == hash(p) and str(again) == canonical
    assert repr(p) == f"Policy('{canonical}')"


@pytest.mark.parametrize(
    "text,offset,words",
    [
        ("window=x", 7, ["number", "window="]),
        ("sinks=4,window=8,bogus=1", 17, ["bogus"]),
        ("window=5;layers=0-1:window=", 27, ["end of the text"]),
        ("sinks=4 ; window=2 $", 19, ["$"]),
        ("heads=3:window=2", 7, ["."]),
        ("sinks=4,sinks=5", 8, ["sinks"]),
        ("window=99999999999999999999999", 7, ["number"]),
    ],
)
def test_parse_errors_carry_the_byte_offset(text, offset, words):
    for parse in (kvsieve.Policy, kvsieve.Policy.parse):
        with pytest.raises(kvsieve.ParseError) as info:
            parse(text)
        err = info.value
        assert isinstance(err, kvsieve.KvsieveError)
        assert err.code == kvsieve.ErrorCode.PARSE and err.code_name == "parse"
        assert err.offset == offset
        assert f"byte {offset}" in str(err)
        for w in words:
            assert w in str(err)


def test_other_errors_have_no_offset():
    with pytest.raises(kvsieve.InvalidArgumentError) as info:
        kvsieve.streaming(1, 10, 0, 0)
    assert not hasattr(info.value, "offset")


def test_validate_position_mode_is_dense_and_spec():
    p = kvsieve.Policy("sinks=4,window=16,positions=contiguous;layers=0:dense,positions=contiguous;heads=2.1:window=8,positions=contiguous")
    p.validate(3, 2)
    assert p.position_mode(1) == ("contiguous", None)
    assert p.is_dense(0) and not p.is_dense(1) and not p.is_dense(2)
    assert p.spec(2, 1) == "window=8,positions=contiguous"
    assert p.spec(2, 0) == "sinks=4,window=16,positions=contiguous"
    assert p.spec(0, 1) == "dense,positions=contiguous"
    lam = kvsieve.Policy("global=2,local=8,max_distance=8")
    assert lam.position_mode(0) == ("capped", 8)
    assert kvsieve.Policy("window=4").position_mode(0) == ("original", None)
    np.testing.assert_array_equal(kvsieve.Policy("sinks=4,window=8").window_pages_to_evict(2, 2, 40, 4), [1, 2, 3, 4, 5, 6, 7])
    assert kvsieve.Policy("sinks=4,window=8;layers=1:dense").window_pages_to_evict(2, 2, 40, 4).tolist() == []


def small_cache(rng, n, hk=2, layers=3, ps=8, key_rope="post", dtype="f32", extra_pages=2, positions=None):
    c = kvsieve.KvCache(layers, hk, D, ps, -(-n // ps) + extra_pages, dtype=dtype, key_rope=key_rope)
    s = c.create_sequence()
    c.append(s, n, positions=positions)
    for layer in range(layers):
        k = rng.standard_normal((n, hk, D)).astype(np.float32)
        v = rng.standard_normal((n, hk, D)).astype(np.float32)
        c.write(s, layer, 0, k, v)
    return c, s


def test_select_composes_the_methods(rng):
    n, hk = 200, 2
    c, s = small_cache(rng, n, hk)
    q = rng.standard_normal((4, D)).astype(np.float32)
    p = kvsieve.Policy("sinks=4,window=16,pages=40;layers=0:dense;heads=2.1:sinks=2,window=5")
    sel = p.select(c, s, 1, q)
    expect = kvsieve.streaming(hk, n, 4, 16).union(kvsieve.page_bounds(c, s, 1, q, 40))
    assert sel == expect
    assert p.select(c, s, 0, q).is_dense()
    sel2 = p.select(c, s, 2, q[None])
    np.testing.assert_array_equal(sel2.head(1), kvsieve.streaming(1, n, 2, 5).head(0))
    expect2 = kvsieve.streaming(hk, n, 4, 16).union(kvsieve.page_bounds(c, s, 2, q, 40))
    np.testing.assert_array_equal(sel2.head(0), expect2.head(0))


@pytest.mark.parametrize("text", ["sinks=4,window=16,pages=40", "window=24;layers=1:dense", "pages=32,min_pages=2;heads=0.1,2.0:sinks=1,window=9"])
def test_decode_with_policy_equals_decode_sparse_over_select(rng, text):
    lens = [150, 30, 97]
    hk, layers = 2, 3
    c = kvsieve.KvCache(layers, hk, D, 8, 60, dtype="f16")
    seqs = []
    for n in lens:
        s = c.create_sequence()
        c.append(s, n)
        for layer in range(layers):
            kv = rng.standard_normal((n, hk, D)).astype(np.float32)
            c.write(s, layer, 0, kv, kv * 0.5)
        seqs.append(s)
    policy = kvsieve.Policy(text)
    q = rng.standard_normal((3, 3 * hk, D)).astype(np.float32)
    for layer in range(layers):
        out, lse, sels = c.decode_with_policy(layer, seqs, q, policy)
        if policy.is_dense(layer):
            assert sels == []
            ref_out, ref_lse = c.decode(layer, seqs, q)
        else:
            expect = [policy.select(c, s, layer, q[b]) for b, s in enumerate(seqs)]
            assert sels == expect
            ref_out, ref_lse = c.decode_sparse(layer, seqs, q, expect)
            for b, s in enumerate(seqs):
                heads = [sels[b].head(h) for h in range(hk)]
                ro, rl = reference.selected_attention(q[b : b + 1], [lens[b] - 1], c.read_keys(s, layer), c.read_values(s, layer), heads)
                np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
                np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(lse, ref_lse)
    # The text form is accepted wherever a policy is.
    a = c.decode_with_policy(1, seqs, q, text)
    b = c.decode_with_policy(1, seqs, q, policy)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("text,mode,max_distance", [("sinks=4,window=16,positions=contiguous", "contiguous", None), ("global=3,local=10,max_distance=10", "capped", 10)])
def test_decode_with_policy_uses_the_policy_position_mode(rng, text, mode, max_distance):
    n = 90
    c, s = small_cache(rng, n, key_rope="pre", positions=np.arange(n) * 3 + 11)
    rope = kvsieve.RopeConfig(THETA, style="half_split")
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    out, lse, sels = c.decode_with_policy(2, [s], q, text, rope=rope)
    ref_out, ref_lse = c.decode_sparse(2, [s], q, sels, rope=rope, position_mode=mode, max_distance=max_distance)
    np.testing.assert_array_equal(out, ref_out)
    ro, rl = reference.selected_attention(
        q,
        [n - 1],
        c.read_keys(s, 2),
        c.read_values(s, 2),
        [sels[0].head(h) for h in range(2)],
        positions=c.positions(s),
        rope_cfg={"theta": THETA},
        position_mode=mode,
        max_distance=max_distance,
    )
    np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
    np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)


def numpy_topk_spans(keys, q, base, budget, span):
    """Brute-force ``topk=budget,span=span`` for one head: rank the tokens outside ``base``
    by the best raw q.k of the group's rows (ties: lower index), then grow hits into spans,
    nearest tokens first, until ``budget`` tokens are taken."""
    n = len(keys)
    base = set(int(t) for t in base)
    cand = [t for t in range(n) if t not in base]
    scores = (q @ keys[cand].T).max(axis=0)
    hits = [cand[i] for i in sorted(range(len(cand)), key=lambda i: (-scores[i], cand[i]))[:budget]]
    taken = []
    for t in hits:
        lo, hi = max(0, t - (span - 1) // 2), min(n - 1, t + span // 2)
        for c in sorted(range(lo, hi + 1), key=lambda c: (abs(c - t), c)):
            if len(taken) < budget and c not in base and c not in taken:
                taken.append(c)
    return sorted(base | set(taken))


def test_expand_spans_matches_the_rule(rng):
    for _ in range(100):
        n = int(rng.integers(1, 150))
        hits = rng.integers(0, 160, size=int(rng.integers(0, 10))).tolist()
        span, budget = int(rng.integers(1, 16)), int(rng.integers(0, 60))
        anyway = sorted(set(rng.integers(0, n, size=int(rng.integers(0, 12))).tolist()))
        got = kvsieve.expand_spans(hits, span, budget, n, anyway)
        assert got.dtype == np.uint32
        # numpy_topk_spans' expansion step, with the hits given directly.
        taken = []
        for t in hits:
            if t >= n:
                continue
            lo, hi = max(0, t - (span - 1) // 2), min(n - 1, t + span // 2)
            for c in sorted(range(lo, hi + 1), key=lambda c: (abs(c - t), c)):
                if len(taken) < budget and c not in anyway and c not in taken:
                    taken.append(c)
        np.testing.assert_array_equal(got, sorted(taken))
    np.testing.assert_array_equal(kvsieve.expand_spans([10, 30], 5, 7, 100), [8, 9, 10, 11, 12, 29, 30])
    with pytest.raises(kvsieve.InvalidArgumentError, match="span"):
        kvsieve.expand_spans([1], 0, 4, 10)
    with pytest.raises(kvsieve.InvalidArgumentError, match="read_anyway"):
        kvsieve.expand_spans([1], 3, 4, 10, [5, 2])


def test_topk_spans_select_and_contiguous_decode(rng):
    """``topk=`` with ``span=`` on keys stored before RoPE: the selection equals numpy's
    brute-force ranking grown into spans, and decode attends over exactly it, numbered
    contiguously."""
    n, hk, sinks, window, budget, span = 150, 2, 3, 10, 20, 7
    c, s = small_cache(rng, n, hk, key_rope="pre")
    text = f"sinks={sinks},window={window},topk={budget},span={span},positions=contiguous"
    p = kvsieve.Policy(text)
    assert str(p) == text
    q = rng.standard_normal((4, D)).astype(np.float32)
    sel = p.select(c, s, 1, q)
    base = [t for t in range(n) if t < sinks or t >= n - window]
    keys = c.read_keys(s, 1)
    for h in range(hk):
        want = numpy_topk_spans(keys[:, h], q[2 * h : 2 * h + 2], base, budget, span)
        np.testing.assert_array_equal(sel.head(h), want)
    rope = kvsieve.RopeConfig(THETA)
    out, lse, sels = c.decode_with_policy(1, [s], q[None], p, rope=rope)
    assert sels[0] == sel
    ro, rl = c.decode_sparse(1, [s], q[None], [sel], rope=rope, position_mode="contiguous")
    np.testing.assert_allclose(out, ro, atol=1e-5)
    np.testing.assert_allclose(lse, rl, atol=1e-5)
    with pytest.raises(kvsieve.InvalidArgumentError, match="span="):
        kvsieve.Policy("window=8,span=4").validate(3, hk)


def test_prefill_with_policy(rng):
    """Window-only heads become row windows (the Λ-mask); other heads attend causally."""
    n, new = 60, 25
    c, s = small_cache(rng, n)
    policy = kvsieve.Policy("pages=16;heads=1.0:sinks=3,window=7;layers=2:dense")
    q = rng.standard_normal((new, 4, D)).astype(np.float32)
    qo = [0, new]
    for layer, windows in [(0, None), (1, [(3, 7), None]), (2, None)]:
        out, lse = c.prefill_with_policy(layer, [s], q, qo, policy)
        ref_out, ref_lse = c.prefill_sparse(layer, [s], q, qo, [kvsieve.Selection.dense(2, n)], windows)
        # Equal to rounding: windowed heads read only the tokens their queries can see.
        np.testing.assert_allclose(out, ref_out, atol=1e-5)
        everything = [np.arange(n)] * 2
        ro, rl = reference.selected_attention(q, range(n - new, n), c.read_keys(s, layer), c.read_values(s, layer), everything, windows=windows)
        np.testing.assert_allclose(out, ro, atol=ATOL)
        np.testing.assert_allclose(lse, rl, atol=ATOL)


def test_streaming_with_eviction_keeps_memory_bounded(rng):
    """A long stream under sinks + window: after every step evict_for_policy frees what the
    policy never reads again, the pages in use stay bounded, and decode equals numpy
    attention over the first `sinks` and the last `window` tokens of the whole stream
    (keys before RoPE, renumbered contiguously)."""
    sinks, window, ps, hk, layers = 4, 16, 4, 2, 2
    policy = kvsieve.Policy(f"sinks={sinks},window={window},positions=contiguous")
    # Room for the sinks' page, the window's pages and one being filled.
    bound = -(-sinks // ps) + -(-window // ps) + 1
    c = kvsieve.KvCache(layers, hk, D, ps, bound + 1, dtype="f32", key_rope="pre")
    rope = kvsieve.RopeConfig(THETA)
    s = c.create_sequence()
    keys = [[] for _ in range(layers)]
    values = [[] for _ in range(layers)]
    evicted = 0
    max_used = 0
    for step in range(300):
        c.append(s, 1)
        t = c.seq_len(s) - 1
        q = rng.standard_normal((1, 2 * hk, D)).astype(np.float32)
        for layer in range(layers):
            k = rng.standard_normal((1, hk, D)).astype(np.float32)
            v = rng.standard_normal((1, hk, D)).astype(np.float32)
            c.write(s, layer, t, k, v)
            keys[layer].append(k[0])
            values[layer].append(v[0])
            out, lse, sels = c.decode_with_policy(layer, [s], q, policy, rope=rope)
            if step % 37 == 0 or step == 299:
                total = step + 1
                kept = sorted(set(range(min(sinks, total))) | set(range(max(total - window, 0), total)))
                ro, rl = reference.selected_attention(
                    q,
                    [total - 1],
                    np.array(keys[layer]),
                    np.array(values[layer]),
                    [kept] * hk,
                    rope_cfg={"theta": THETA},
                    position_mode="contiguous",
                )
                np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
                np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)
                # The original positions of what the selection read survive eviction.
                pos = c.positions(s)
                assert pos[sels[0].head(0)].tolist() == kept
        evicted += c.evict_for_policy(s, policy)
        max_used = max(max_used, c.stats()["pages_used"])
    assert evicted > 0
    assert max_used <= bound
    assert c.seq_len(s) <= sinks + window + 2 * ps
    c.check_invariants()
