"""paged_decode / paged_prefill over K/V pages that numpy owns (the vLLM / SGLang case)."""

import numpy as np
import pytest

import kvsieve
import reference

D = 64
ATOL = 2e-4


def random_table(rng, lens, page_size, num_pages):
    """A CSR page table over distinct random pages for sequences of the given lengths."""
    counts = [-(-n // page_size) for n in lens]
    pages = rng.permutation(num_pages)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * page_size if c else 0 for n, c in zip(lens, counts)], dtype=np.int32)
    return indptr, pages, last


def gather(pages, layout, indptr, indices, last, b, page_size):
    """Tokens of sequence b as [n, H, D] (float64), read from the page array with numpy."""
    rows = []
    for i in range(indptr[b], indptr[b + 1]):
        page = pages[indices[i]].astype(np.float64)
        if layout == "hnd":
            page = page.transpose(1, 0, 2)
        n = last[b] if i == indptr[b + 1] - 1 else page_size
        rows.append(page[:n])
    return np.concatenate(rows) if rows else np.zeros((0, pages.shape[2 if layout == "nhd" else 1], D))


def page_shape(layout, num_pages, page_size, heads):
    return (num_pages, page_size, heads, D) if layout == "nhd" else (num_pages, heads, page_size, D)


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_decode_separate_arrays(rng, layout, np_dtype, group):
    hk, ps, num_pages = 2, 16, 40
    lens = [5, 64, 100, 0, 17]
    k = rng.standard_normal(page_shape(layout, num_pages, ps, hk)).astype(np_dtype)
    v = rng.standard_normal(page_shape(layout, num_pages, ps, hk)).astype(np_dtype)
    indptr, indices, last = random_table(rng, lens, ps, num_pages)
    q = rng.standard_normal((len(lens), hk * group, D)).astype(np.float32)
    out, lse = kvsieve.paged_decode(k, v, indptr, indices, last, q, layout=layout)
    for b in range(len(lens)):
        kb = gather(k, layout, indptr, indices, last, b, ps)
        vb = gather(v, layout, indptr, indices, last, b, ps)
        ro, rl = reference.attention(q[b : b + 1], kb, vb)
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_paged_decode_views_into_combined_array(rng, layout):
    """K and V as strided views into one [num_pages, 2, ...] array, read without a copy."""
    hk, ps, num_pages = 4, 8, 30
    kv = rng.standard_normal((num_pages, 2) + page_shape(layout, 1, ps, hk)[1:]).astype(np.float16)
    k, v = kv[:, 0], kv[:, 1]
    assert not k.flags.c_contiguous and np.shares_memory(k, kv)
    lens = [33, 1, 70]
    indptr, indices, last = random_table(rng, lens, ps, num_pages)
    q = rng.standard_normal((3, 8, D)).astype(np.float32)
    out, lse = kvsieve.paged_decode(k, v, indptr, indices, last, q, layout=layout)
    for b in range(3):
        kb = gather(k, layout, indptr, indices, last, b, ps)
        vb = gather(v, layout, indptr, indices, last, b, ps)
        ro, rl = reference.attention(q[b : b + 1], kb, vb)
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
    # Same answer as over contiguous copies.
    out2, lse2 = kvsieve.paged_decode(
        np.ascontiguousarray(k), np.ascontiguousarray(v), indptr, indices, last, q, layout=layout
    )
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)


def test_paged_decode_matches_kvcache(rng):
    """The cache's own pages, copied out into numpy in the same layout, give the same answer."""
    c = kvsieve.KvCache(1, 2, D, 16, 12, dtype="f32")
    seqs = []
    for n in (20, 50):
        s = c.create_sequence()
        c.append(s, n)
        c.write(s, 0, 0, *(rng.standard_normal((2, n, 2, D)).astype(np.float32)))
        seqs.append(s)
    indptr, indices, last = c.page_table(seqs)
    k = np.zeros((12, 16, 2, D), np.float32)
    v = np.zeros((12, 16, 2, D), np.float32)
    for s in seqs:
        keys, vals = c.read_keys(s, 0), c.read_values(s, 0)
        for t, page in enumerate(np.repeat(c.seq_pages(s), 16)[: c.seq_len(s)]):
            k[page, t % 16], v[page, t % 16] = keys[t], vals[t]
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    out, lse = kvsieve.paged_decode(k, v, indptr, indices, last, q)
    c_out, c_lse = c.decode(0, seqs, q)
    np.testing.assert_allclose(out, c_out, atol=1e-5)
    np.testing.assert_allclose(lse, c_lse, atol=1e-5)


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_paged_prefill(rng, layout):
    hk, ps, num_pages = 2, 16, 30
    lens, new = [40, 9, 90], [12, 9, 1]
    k = rng.standard_normal(page_shape(layout, num_pages, ps, hk)).astype(np.float32)
    v = rng.standard_normal(page_shape(layout, num_pages, ps, hk)).astype(np.float32)
    indptr, indices, last = random_table(rng, lens, ps, num_pages)
    qo_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], 8, D)).astype(np.float32)
    for causal in (True, False):
        out, lse = kvsieve.paged_prefill(k, v, indptr, indices, last, q, qo_indptr, causal=causal, layout=layout)
        for b in range(3):
            rows = slice(qo_indptr[b], qo_indptr[b + 1])
            kb = gather(k, layout, indptr, indices, last, b, ps)
            vb = gather(v, layout, indptr, indices, last, b, ps)
            ro, rl = reference.attention(q[rows], kb, vb, causal=causal)
            np.testing.assert_allclose(out[rows], ro, atol=ATOL)
            np.testing.assert_allclose(lse[rows], rl, atol=ATOL)


def test_paged_decode_pre_rope_with_slot_positions(rng):
    """Pre-RoPE keys in engine memory, rotated by per-slot positions the engine passes; the
    (pre-RoPE) query is rotated at its token's position."""
    hk, ps, num_pages = 2, 8, 10
    k = rng.standard_normal((num_pages, ps, hk, D)).astype(np.float32)
    v = rng.standard_normal((num_pages, ps, hk, D)).astype(np.float32)
    positions = rng.integers(0, 5000, num_pages * ps).astype(np.int32)
    indptr, indices, last = random_table(rng, [19], ps, num_pages)
    rope = kvsieve.RopeConfig(500000.0, style="adjacent_pairs")
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    out, lse = kvsieve.paged_decode(
        k, v, indptr, indices, last, q, positions=positions, key_rope="pre", rope=rope, logit_soft_cap=30.0
    )
    slots = [indices[t // ps] * ps + t % ps for t in range(19)]
    kb = reference.rope(gather(k, "nhd", indptr, indices, last, 0, ps), positions[slots], 500000.0, "adjacent_pairs")
    qb = reference.rope(q, positions[slots[-1:]], 500000.0, "adjacent_pairs")  # the query is the last token
    ro, rl = reference.attention(qb, kb, gather(v, "nhd", indptr, indices, last, 0, ps), logit_soft_cap=30.0)
    np.testing.assert_allclose(out[0], ro[0], atol=ATOL)
    np.testing.assert_allclose(lse[0], rl[0], atol=ATOL)
    # Without positions, a token's position is its index in the sequence.
    out, _ = kvsieve.paged_decode(k, v, indptr, indices, last, q, key_rope="pre", rope=rope)
    kb = reference.rope(gather(k, "nhd", indptr, indices, last, 0, ps), np.arange(19), 500000.0, "adjacent_pairs")
    qb = reference.rope(q, [18], 500000.0, "adjacent_pairs")
    ro, _ = reference.attention(qb, kb, gather(v, "nhd", indptr, indices, last, 0, ps))
    np.testing.assert_allclose(out[0], ro[0], atol=ATOL)
