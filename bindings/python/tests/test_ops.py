"""merge_states and apply_rope against their numpy formulas."""

import numpy as np
import pytest

import kvsieve
import reference


def test_merge_states_formula(rng):
    n, h, d = 5, 3, 32
    v_a = rng.standard_normal((n, h, d)).astype(np.float32)
    v_b = rng.standard_normal((n, h, d)).astype(np.float32)
    lse_a = rng.standard_normal((n, h)).astype(np.float32) * 3
    lse_b = rng.standard_normal((n, h)).astype(np.float32) * 3
    v, lse = kvsieve.merge_states(v_a, lse_a, v_b, lse_b)
    rv, rl = reference.merge(v_a, lse_a, v_b, lse_b)
    assert v.dtype == np.float32 and v.shape == (n, h, d) and lse.shape == (n, h)
    np.testing.assert_allclose(v, rv, atol=1e-5)
    np.testing.assert_allclose(lse, rl, atol=1e-5)
    v16, _ = kvsieve.merge_states(v_a.astype(np.float16), lse_a, v_b[:, :, :], lse_b, out_dtype="f16")
    assert v16.dtype == np.float16
    rv16, _ = reference.merge(v_a.astype(np.float16), lse_a, v_b, lse_b)
    np.testing.assert_allclose(v16.astype(np.float32), rv16, atol=3e-3)


def test_merge_states_with_empty_side(rng):
    v_a = rng.standard_normal((2, 2, 8)).astype(np.float32)
    lse_a = np.array([[-np.inf, 1.0], [0.5, -np.inf]], np.float32)
    v_b = rng.standard_normal((2, 2, 8)).astype(np.float32)
    lse_b = np.array([[0.2, -np.inf], [-np.inf, -np.inf]], np.float32)
    v, lse = kvsieve.merge_states(v_a, lse_a, v_b, lse_b)
    np.testing.assert_allclose(v[0, 0], v_b[0, 0], atol=1e-6)
    np.testing.assert_allclose(v[0, 1], v_a[0, 1], atol=1e-6)
    np.testing.assert_allclose(v[1, 0], v_a[1, 0], atol=1e-6)
    assert lse[0, 0] == pytest.approx(0.2) and lse[0, 1] == pytest.approx(1.0)
    assert np.isneginf(lse[1, 1])


def test_merge_states_equals_attention_over_the_union(rng):
    """Decode over two halves of a sequence, merged, equals decode over the whole."""
    hk, d, ps = 2, 64, 8
    k = rng.standard_normal((6, ps, hk, d)).astype(np.float32)
    v = rng.standard_normal((6, ps, hk, d)).astype(np.float32)
    q = rng.standard_normal((1, 4, d)).astype(np.float32)
    whole = kvsieve.paged_decode(k, v, [0, 6], np.arange(6), [ps], q)
    a = kvsieve.paged_decode(k, v, [0, 2], [0, 1], [ps], q)
    b = kvsieve.paged_decode(k, v, [0, 4], [2, 3, 4, 5], [ps], q)
    out, lse = kvsieve.merge_states(a[0], a[1], b[0], b[1])
    np.testing.assert_allclose(out, whole[0], atol=1e-5)
    np.testing.assert_allclose(lse, whole[1], atol=1e-5)


@pytest.mark.parametrize("style", ["half_split", "adjacent_pairs"])
@pytest.mark.parametrize("rotary_dim", [0, 16])
def test_apply_rope_formula(rng, style, rotary_dim):
    x = rng.standard_normal((7, 3, 32)).astype(np.float32)
    positions = rng.integers(0, 10000, 7)
    y = kvsieve.apply_rope(x, positions, 10000.0, style, rotary_dim, 1.5)
    assert y.dtype == np.float32 and y.shape == x.shape and not np.shares_memory(x, y)
    np.testing.assert_allclose(y, reference.rope(x, positions, 10000.0, style, rotary_dim, 1.5), atol=2e-4)
    if rotary_dim:
        np.testing.assert_array_equal(y[..., rotary_dim:], x[..., rotary_dim:])


def test_apply_rope_in_place_and_dtypes(rng):
    x = rng.standard_normal((4, 2, 16)).astype(np.float32)
    expected = reference.rope(x, [0, 1, 2, 3], 10000.0)
    orig = x.copy()
    y = kvsieve.apply_rope(x, np.arange(4, dtype=np.int32), 10000.0, inplace=True)
    assert y is x
    np.testing.assert_allclose(x, expected, atol=1e-5)
    assert not np.array_equal(x, orig)
    # float16 in, float16 out.
    x16 = orig.astype(np.float16)
    y16 = kvsieve.apply_rope(x16, [0, 1, 2, 3], 10000.0)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float32), reference.rope(x16, [0, 1, 2, 3], 10000.0), atol=4e-3)
    # In place on a strided view writes through to the base array and nowhere else.
    base = rng.standard_normal((4, 2, 32)).astype(np.float32)
    keep = base.copy()
    view = base[:, :, ::2]
    kvsieve.apply_rope(view, [5, 6, 7, 8], 500.0, "adjacent_pairs", inplace=True)
    np.testing.assert_allclose(base[:, :, ::2], reference.rope(keep[:, :, ::2], [5, 6, 7, 8], 500.0, "adjacent_pairs"), atol=1e-5)
    np.testing.assert_array_equal(base[:, :, 1::2], keep[:, :, 1::2])
    # Not in place on a reversed view: a new array.
    rev = keep[::-1]
    np.testing.assert_allclose(kvsieve.apply_rope(rev, [1, 2, 3, 4], 100.0), reference.rope(rev, [1, 2, 3, 4], 100.0), atol=1e-5)


def test_rope_config():
    r = kvsieve.RopeConfig(10000.0)
    assert (r.theta, r.style, r.rotary_dim, r.position_scale) == (10000.0, "half_split", 0, 1.0)
    r2 = kvsieve.RopeConfig(theta=1e5, style="adjacent_pairs", rotary_dim=32, position_scale=4.0)
    assert (r2.theta, r2.style, r2.rotary_dim, r2.position_scale) == (1e5, "adjacent_pairs", 32, 4.0)
    assert r2 == kvsieve.RopeConfig(1e5, "adjacent_pairs", 32, 4.0) and r != r2
    assert repr(r2) == 'RopeConfig(theta=100000, style="adjacent_pairs", rotary_dim=32, position_scale=4)'
    with pytest.raises(AttributeError):
        r.theta = 5.0
