"""Sparse attention over Selections (KvCache.decode_sparse / prefill_sparse, the paged_*_sparse
functions) and KvCache.compact, against numpy attention over exactly the selected tokens."""

import numpy as np
import pytest

import kvsieve
import reference

D = 64
ATOL = 2e-4
# RoPE at read time rotates in float32, so allow a little more there.
ROPE_ATOL = 1e-3
THETA = 10000.0


def build(rng, dtype, hk, lens, page_size=16, key_rope="post", layers=2, positions=None, spare=2):
    pages = sum(-(-n // page_size) for n in lens) + spare
    c = kvsieve.KvCache(layers, hk, D, page_size, pages, dtype=dtype, key_rope=key_rope)
    seqs = []
    for i, n in enumerate(lens):
        s = c.create_sequence()
        c.append(s, n, positions=None if positions is None else positions[i])
        for layer in range(layers):
            k = rng.standard_normal((n, hk, D)).astype(np.float32)
            v = rng.standard_normal((n, hk, D)).astype(np.float32)
            c.write(s, layer, 0, k, v)
        seqs.append(s)
    return c, seqs


def random_selection(rng, hk, n, density):
    heads = [np.flatnonzero(rng.random(n) < density) for _ in range(hk)]
    return kvsieve.Selection.from_heads(n, heads)


def heads_of(sel):
    return [sel.head(h) for h in range(sel.num_kv_heads)]


MODES = [("original", None), ("contiguous", None), ("capped", 7)]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("hk,group", [(4, 1), (2, 4)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6, 1.0])
def test_decode_sparse_matches_reference(rng, dtype, hk, group, density):
    lens = [1, 37, 130, 16]
    c, seqs = build(rng, dtype, hk, lens)
    hq = hk * group
    sels = [random_selection(rng, hk, n, density) for n in lens]
    q = rng.standard_normal((len(seqs), hq, D)).astype(np.float32)
    for layer in range(2):
        out, lse = c.decode_sparse(layer, seqs, q, sels, chunk_size=8)
        assert out.shape == q.shape and lse.shape == (len(seqs), hq)
        for b, s in enumerate(seqs):
            ro, rl = reference.selected_attention(
                q[b : b + 1], [lens[b] - 1], c.read_keys(s, layer), c.read_values(s, layer), heads_of(sels[b])
            )
            np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
            np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
    # A dense selection gives dense decode.
    dense = [kvsieve.Selection.dense(hk, n) for n in lens]
    a, la = c.decode_sparse(0, seqs, q, dense)
    b_, lb = c.decode(0, seqs, q)
    np.testing.assert_allclose(a, b_, atol=ATOL)
    np.testing.assert_allclose(la, lb, atol=ATOL)


@pytest.mark.parametrize("mode,max_distance", MODES)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_decode_sparse_pre_rope_position_modes(rng, mode, max_distance, dtype):
    """Pre-RoPE keys: the query, given before RoPE too, is rotated at its token's position
    as the mode numbers it, each selected key at its own."""
    hk, group = 2, 3
    lens = [60, 23]
    positions = [np.arange(60) * 2 + 100, np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 26, 43])]
    c, seqs = build(rng, dtype, hk, lens, key_rope="pre", positions=positions)
    rope = kvsieve.RopeConfig(THETA, style="adjacent_pairs")
    sels = [kvsieve.streaming(hk, n, 4, 9).union(random_selection(rng, hk, n, 0.3)) for n in lens]
    q = rng.standard_normal((2, hk * group, D)).astype(np.float32)
    out, lse = c.decode_sparse(1, seqs, q, sels, rope=rope, position_mode=mode, max_distance=max_distance)
    for b, s in enumerate(seqs):
        ro, rl = reference.selected_attention(
            q[b : b + 1],
            [lens[b] - 1],
            c.read_keys(s, 1),
            c.read_values(s, 1),
            heads_of(sels[b]),
            positions=c.positions(s),
            rope_cfg={"theta": THETA, "style": "adjacent_pairs"},
            position_mode=mode,
            max_distance=max_distance,
        )
        np.testing.assert_allclose(out[b], ro[0], atol=ROPE_ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ROPE_ATOL)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("hk,group", [(4, 1), (2, 4)])
@pytest.mark.parametrize("with_windows", [False, True])
def test_prefill_sparse_matches_reference(rng, dtype, hk, group, with_windows):
    lens, new = [40, 7, 100], [17, 7, 33]
    c, seqs = build(rng, dtype, hk, lens)
    hq = hk * group
    qo_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], hq, D)).astype(np.float32)
    sels = [random_selection(rng, hk, n, 0.5) for n in lens]
    windows = None
    if with_windows:
        windows = [(2, 5), None, (0, 1), [3, 12]][:hk] if hk == 4 else [(4, 6), None]
    out, lse = c.prefill_sparse(1, seqs, q, qo_indptr, sels, windows)
    for b, s in enumerate(seqs):
        rows = slice(qo_indptr[b], qo_indptr[b + 1])
        q_tokens = range(lens[b] - new[b], lens[b])
        ro, rl = reference.selected_attention(
            q[rows], q_tokens, c.read_keys(s, 1), c.read_values(s, 1), heads_of(sels[b]), windows=windows
        )
        np.testing.assert_allclose(out[rows], ro, atol=ATOL)
        np.testing.assert_allclose(lse[rows], rl, atol=ATOL)


@pytest.mark.parametrize("mode,max_distance", MODES)
def test_prefill_sparse_pre_rope_position_modes_with_windows(rng, mode, max_distance):
    hk = 2
    lens, new = [50, 12], [20, 12]
    positions = [np.arange(50) + 1000, np.arange(12) * 5]
    c, seqs = build(rng, "f32", hk, lens, key_rope="pre", positions=positions)
    rope = kvsieve.RopeConfig(THETA, rotary_dim=32)
    qo_indptr = np.array([0, 20, 32], np.int32)
    q = rng.standard_normal((32, 2 * hk, D)).astype(np.float32)
    sels = [random_selection(rng, hk, n, 0.7) for n in lens]
    windows = [(3, 8), None]
    out, lse = c.prefill_sparse(0, seqs, q, qo_indptr, sels, windows, rope=rope, position_mode=mode, max_distance=max_distance)
    for b, s in enumerate(seqs):
        rows = slice(qo_indptr[b], qo_indptr[b + 1])
        ro, rl = reference.selected_attention(
            q[rows],
            range(lens[b] - new[b], lens[b]),
            c.read_keys(s, 0),
            c.read_values(s, 0),
            heads_of(sels[b]),
            positions=c.positions(s),
            rope_cfg={"theta": THETA, "rotary_dim": 32},
            position_mode=mode,
            max_distance=max_distance,
            windows=windows,
        )
        np.testing.assert_allclose(out[rows], ro, atol=ROPE_ATOL)
        np.testing.assert_allclose(lse[rows], rl, atol=ROPE_ATOL)


@pytest.mark.parametrize("mode,max_distance", MODES)
def test_dense_decode_and_prefill_take_position_modes(rng, mode, max_distance):
    """position_mode also applies to dense decode / prefill (every token selected)."""
    lens = [45]
    c, seqs = build(rng, "f32", 2, lens, key_rope="pre", positions=[np.arange(45) * 3])
    rope = kvsieve.RopeConfig(THETA)
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    out, lse = c.decode(0, seqs, q, rope=rope, position_mode=mode, max_distance=max_distance)
    args = dict(positions=c.positions(seqs[0]), rope_cfg={"theta": THETA}, position_mode=mode, max_distance=max_distance)
    everything = [np.arange(45)] * 2
    ro, rl = reference.selected_attention(q, [44], c.read_keys(seqs[0], 0), c.read_values(seqs[0], 0), everything, **args)
    np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
    np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)
    qp = rng.standard_normal((6, 4, D)).astype(np.float32)
    out, lse = c.prefill(0, seqs, qp, [0, 6], rope=rope, position_mode=mode, max_distance=max_distance)
    ro, rl = reference.selected_attention(qp, range(39, 45), c.read_keys(seqs[0], 0), c.read_values(seqs[0], 0), everything, **args)
    np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
    np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)


def engine_pages(rng, hk, lens, page_size, num_pages, layout):
    shape = (num_pages, page_size, hk, D) if layout == "nhd" else (num_pages, hk, page_size, D)
    k = rng.standard_normal(shape).astype(np.float16)
    v = rng.standard_normal(shape).astype(np.float16)
    counts = [-(-n // page_size) for n in lens]
    indices = rng.permutation(num_pages)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (cnt - 1) * page_size if cnt else 0 for n, cnt in zip(lens, counts)], np.int32)
    return k, v, indptr, indices, last


def gather(pages, layout, indptr, indices, b, n):
    rows = [pages[p] if layout == "nhd" else pages[p].transpose(1, 0, 2) for p in indices[indptr[b] : indptr[b + 1]]]
    return np.concatenate(rows)[:n].astype(np.float64) if rows else np.zeros((0, pages.shape[2], D))


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_paged_decode_and_prefill_sparse(rng, layout):
    hk, ps, lens = 2, 8, [30, 5, 64]
    k, v, indptr, indices, last = engine_pages(rng, hk, lens, ps, 24, layout)
    sels = [random_selection(rng, hk, n, 0.5) for n in lens]
    q = rng.standard_normal((3, 4 * hk, D)).astype(np.float32)
    out, lse = kvsieve.paged_decode_sparse(k, v, indptr, indices, last, q, sels, layout=layout)
    for b, n in enumerate(lens):
        kb, vb = gather(k, layout, indptr, indices, b, n), gather(v, layout, indptr, indices, b, n)
        ro, rl = reference.selected_attention(q[b : b + 1], [n - 1], kb, vb, heads_of(sels[b]))
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
    new = [4, 5, 10]
    qo_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    qp = rng.standard_normal((qo_indptr[-1], 4 * hk, D)).astype(np.float32)
    windows = [None, (1, 3)]
    out, lse = kvsieve.paged_prefill_sparse(k, v, indptr, indices, last, qp, qo_indptr, sels, windows, layout=layout)
    for b, n in enumerate(lens):
        kb, vb = gather(k, layout, indptr, indices, b, n), gather(v, layout, indptr, indices, b, n)
        rows = slice(qo_indptr[b], qo_indptr[b + 1])
        ro, rl = reference.selected_attention(qp[rows], range(n - new[b], n), kb, vb, heads_of(sels[b]), windows=windows)
        np.testing.assert_allclose(out[rows], ro, atol=ATOL)
        np.testing.assert_allclose(lse[rows], rl, atol=ATOL)


def test_paged_sparse_pre_rope_with_positions(rng):
    hk, ps, lens = 1, 4, [21]
    k, v, indptr, indices, last = engine_pages(rng, hk, lens, ps, 8, "nhd")
    slot_pos = rng.permutation(8 * ps).astype(np.int32)  # an arbitrary original position per slot
    sels = [kvsieve.lambda_mask(hk, 21, 2, 6)]
    q = rng.standard_normal((1, 2, D)).astype(np.float32)
    rope = kvsieve.RopeConfig(THETA)
    out, lse = kvsieve.paged_decode_sparse(
        k, v, indptr, indices, last, q, sels, positions=slot_pos, key_rope="pre", rope=rope, position_mode="capped", max_distance=5
    )
    pos = np.concatenate([slot_pos[p * ps : (p + 1) * ps] for p in indices])[:21]
    kb, vb = gather(k, "nhd", indptr, indices, 0, 21), gather(v, "nhd", indptr, indices, 0, 21)
    ro, rl = reference.selected_attention(
        q, [20], kb, vb, heads_of(sels[0]), positions=pos, rope_cfg={"theta": THETA}, position_mode="capped", max_distance=5
    )
    np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
    np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)


@pytest.mark.parametrize("key_rope", ["post", "pre"])
def test_compact_then_decode_equals_reference_over_kept(rng, key_rope):
    hk, n = 2, 50
    c, (s,) = build(rng, "f32", hk, [n], page_size=8, key_rope=key_rope, positions=[np.arange(n) * 2 + 7], spare=8)
    keys = [c.read_keys(s, layer) for layer in range(2)]
    values = [c.read_values(s, layer) for layer in range(2)]
    pos = c.positions(s)
    keep = np.array([0, 1, 2, 10, 11, 30, 45, 46, 47, 48, 49])
    c.compact(s, keep)
    assert c.seq_len(s) == len(keep)
    np.testing.assert_array_equal(c.positions(s), pos[keep])
    c.check_invariants()
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    rope = kvsieve.RopeConfig(THETA) if key_rope == "pre" else None
    rope_cfg = {"theta": THETA} if key_rope == "pre" else None
    for layer in range(2):
        out, lse = c.decode(layer, [s], q, rope=rope)
        ro, rl = reference.selected_attention(q, [n - 1], keys[layer], values[layer], [keep, keep], positions=pos, rope_cfg=rope_cfg)
        np.testing.assert_allclose(out, ro, atol=ROPE_ATOL)
        np.testing.assert_allclose(lse, rl, atol=ROPE_ATOL)


@pytest.mark.parametrize("per", ["layer", "head"])
def test_compact_per_layer_and_per_head(rng, per):
    hk, n, layers = 2, 40, 2
    c, (s,) = build(rng, "f32", hk, [n], page_size=8, spare=6)
    keys = [c.read_keys(s, layer) for layer in range(layers)]
    values = [c.read_values(s, layer) for layer in range(layers)]
    count = 12
    lists = {
        "layer": [np.sort(rng.choice(n - 1, count - 1, replace=False)).tolist() + [n - 1] for _ in range(layers)],
        "head": [np.sort(rng.choice(n - 1, count - 1, replace=False)).tolist() + [n - 1] for _ in range(layers * hk)],
    }[per]
    c.compact(s, lists, per=per)
    assert c.seq_len(s) == count
    q = rng.standard_normal((1, 2 * hk, D)).astype(np.float32)
    for layer in range(layers):
        kept = [lists[layer]] * hk if per == "layer" else [lists[layer * hk + h] for h in range(hk)]
        out, lse = c.decode(layer, [s], q)
        ro, rl = reference.selected_attention(q, [n - 1], keys[layer], values[layer], kept)
        np.testing.assert_allclose(out, ro, atol=ATOL)
        np.testing.assert_allclose(lse, rl, atol=ATOL)
        for h in range(hk):
            np.testing.assert_array_equal(c.read_keys(s, layer)[:, h], keys[layer][kept[h], h])
    c.check_invariants()
