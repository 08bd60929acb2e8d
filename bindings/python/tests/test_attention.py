"""KvCache.decode / KvCache.prefill against the numpy reference, on random data."""

import numpy as np
import pytest

import kvsieve
import reference

D = 64
# Attention is compared against the reference over the keys and values as stored (read back
# from the cache), so the only error left is f32 accumulation and the query's own dtype.
ATOL = 2e-4


def build(rng, dtype, num_kv_heads, lens, page_size=16, key_rope="post", layers=2, positions=None):
    """A cache holding one sequence per entry of `lens`, random K/V at every layer."""
    pages = sum(-(-n // page_size) for n in lens) + 2
    c = kvsieve.KvCache(layers, num_kv_heads, D, page_size, pages, dtype=dtype, key_rope=key_rope)
    seqs = []
    for i, n in enumerate(lens):
        s = c.create_sequence()
        c.append(s, n, positions=None if positions is None else positions[i])
        for layer in range(layers):
            k = rng.standard_normal((n, num_kv_heads, D)).astype(np.float32)
            v = rng.standard_normal((n, num_kv_heads, D)).astype(np.float32)
            c.write(s, layer, 0, k, v)
        seqs.append(s)
    return c, seqs


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("num_kv_heads,group", [(4, 1), (2, 4)])
def test_decode_matches_reference(rng, dtype, num_kv_heads, group):
    lens = [1, 37, 130, 16]  # ragged, including page-aligned and single-token sequences
    c, seqs = build(rng, dtype, num_kv_heads, lens)
    hq = num_kv_heads * group
    q = rng.standard_normal((len(seqs), hq, D)).astype(np.float32)
    for layer in range(2):
        out, lse = c.decode(layer, seqs, q)
        assert out.shape == (len(seqs), hq, D) and out.dtype == np.float32
        assert lse.shape == (len(seqs), hq) and lse.dtype == np.float32
        for b, s in enumerate(seqs):
            ro, rl = reference.attention(q[b : b + 1], c.read_keys(s, layer), c.read_values(s, layer))
            np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
            np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)


def test_decode_batch_order_and_repeats(rng):
    c, seqs = build(rng, "f16", 2, [20, 45])
    q = rng.standard_normal((3, 8, D)).astype(np.float32)
    order = [seqs[1], seqs[0], seqs[1]]
    out, _ = c.decode(0, order, q)
    for b, s in enumerate(order):
        ro, _ = reference.attention(q[b : b + 1], c.read_keys(s, 0), c.read_values(s, 0))
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)


def test_decode_options(rng):
    c, seqs = build(rng, "f32", 2, [50, 300])
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    base, base_lse = c.decode(1, seqs, q)
    # Chunked (flash-decoding split) gives the same answer.
    for chunk in (1, 7, 64):
        out, lse = c.decode(1, seqs, q, chunk_size=chunk)
        np.testing.assert_allclose(out, base, atol=ATOL)
        np.testing.assert_allclose(lse, base_lse, atol=ATOL)
    # Scale and logit soft-cap.
    out, lse = c.decode(1, seqs, q, scale=0.3, logit_soft_cap=5.0)
    for b, s in enumerate(seqs):
        ro, rl = reference.attention(q[b : b + 1], c.read_keys(s, 1), c.read_values(s, 1), scale=0.3, logit_soft_cap=5.0)
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
    # float16 queries and a float16 output.
    q16 = q.astype(np.float16)
    out16, lse16 = c.decode(1, seqs, q16, out_dtype="f16")
    assert out16.dtype == np.float16 and lse16.dtype == np.float32
    ref, _ = c.decode(1, seqs, q16.astype(np.float32))
    np.testing.assert_allclose(out16.astype(np.float32), ref, atol=2e-3, rtol=2e-3)
    # A strided query view.
    q_wide = rng.standard_normal((2, 4, 2 * D)).astype(np.float32)
    out, _ = c.decode(1, seqs, q_wide[:, :, ::2])
    ref, _ = c.decode(1, seqs, np.ascontiguousarray(q_wide[:, :, ::2]))
    np.testing.assert_array_equal(out, ref)


def test_decode_empty_sequence_and_empty_batch(rng):
    c, seqs = build(rng, "f32", 2, [0, 5])
    q = rng.standard_normal((2, 2, D)).astype(np.float32)
    out, lse = c.decode(0, seqs, q)
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.all(np.isneginf(lse[0]))
    out, lse = c.decode(0, [], np.zeros((0, 2, D), np.float32))
    assert out.shape == (0, 2, D) and lse.shape == (0, 2)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("num_kv_heads,group", [(4, 1), (2, 4)])
def test_prefill_matches_reference(rng, dtype, num_kv_heads, group):
    lens = [40, 7, 100]
    new = [17, 7, 33]  # query rows: the last tokens of each sequence
    c, seqs = build(rng, dtype, num_kv_heads, lens)
    hq = num_kv_heads * group
    qo_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], hq, D)).astype(np.float32)
    for causal in (True, False):
        out, lse = c.prefill(1, seqs, q, qo_indptr, causal=causal)
        assert out.shape == q.shape and lse.shape == (q.shape[0], hq)
        for b, s in enumerate(seqs):
            rows = slice(qo_indptr[b], qo_indptr[b + 1])
            ro, rl = reference.attention(q[rows], c.read_keys(s, 1), c.read_values(s, 1), causal=causal)
            np.testing.assert_allclose(out[rows], ro, atol=ATOL)
            np.testing.assert_allclose(lse[rows], rl, atol=ATOL)


def test_prefill_of_one_token_equals_decode(rng):
    c, seqs = build(rng, "f16", 2, [33, 70])
    q = rng.standard_normal((2, 8, D)).astype(np.float32)
    d_out, d_lse = c.decode(0, seqs, q)
    p_out, p_lse = c.prefill(0, seqs, q, [0, 1, 2], scale=None)
    np.testing.assert_allclose(p_out, d_out, atol=ATOL)
    np.testing.assert_allclose(p_lse, d_lse, atol=ATOL)


@pytest.mark.parametrize("style", ["half_split", "adjacent_pairs"])
def test_pre_rope_keys_rotated_at_read(rng, style):
    """Keys stored before RoPE are rotated by their stored positions when attention reads
    them; the query, given before RoPE too, is rotated at its own token's position."""
    positions = [np.arange(30) * 3 + 5, np.array([9, 2, 40, 41, 7], dtype=np.int32)]
    c, seqs = build(rng, "f32", 2, [30, 5], key_rope="pre", positions=positions)
    rope = kvsieve.RopeConfig(10000.0, style=style, rotary_dim=48, position_scale=2.0)
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    out, lse = c.decode(0, seqs, q, rope=rope)
    for b, s in enumerate(seqs):
        pos = c.positions(s)
        k = reference.rope(c.read_keys(s, 0), pos, 10000.0, style, 48, 2.0)
        qb = reference.rope(q[b : b + 1], pos[-1:], 10000.0, style, 48, 2.0)
        ro, rl = reference.attention(qb, k, c.read_values(s, 0))
        np.testing.assert_allclose(out[b], ro[0], atol=ATOL)
        np.testing.assert_allclose(lse[b], rl[0], atol=ATOL)
    # Post-RoPE caches ignore `rope`.
    c2, seqs2 = build(rng, "f32", 2, [12])
    a, _ = c2.decode(0, seqs2, q[:1], rope=rope)
    b_, _ = c2.decode(0, seqs2, q[:1])
    np.testing.assert_array_equal(a, b_)


def test_pre_rope_prefill(rng):
    """Prefill over pre-RoPE keys: query row i is rotated at the position of its own token."""
    positions = [np.arange(40) + 1000, (np.arange(9) * 7).astype(np.int32)]
    c, seqs = build(rng, "f16", 2, [40, 9], key_rope="pre", positions=positions)
    rope = kvsieve.RopeConfig(10000.0, style="half_split")
    new = [6, 9]
    qo_indptr = np.array([0, 6, 15], np.int32)
    q = rng.standard_normal((15, 4, D)).astype(np.float32)
    out, lse = c.prefill(1, seqs, q, qo_indptr, rope=rope)
    for b, s in enumerate(seqs):
        pos = c.positions(s)
        rows = slice(qo_indptr[b], qo_indptr[b + 1])
        k = reference.rope(c.read_keys(s, 1), pos, 10000.0)
        qb = reference.rope(q[rows], pos[-new[b] :], 10000.0)
        ro, rl = reference.attention(qb, k, c.read_values(s, 1))
        np.testing.assert_allclose(out[rows], ro, atol=ATOL)
        np.testing.assert_allclose(lse[rows], rl, atol=ATOL)
