"""The CUDA entry points: errors everywhere; with torch and a GPU (and a wheel built with
the ``cuda`` feature), decode, sparse decode, append and merge_states on device tensors
against the CPU functions."""

import numpy as np
import pytest

import kvsieve


def test_without_a_usable_gpu_errors_name_the_problem():
    try:
        n = kvsieve.cuda_device_count()
    except kvsieve.CudaUnavailableError as e:
        assert e.code == kvsieve.ErrorCode.CUDA_UNAVAILABLE
    else:
        assert n >= 0
    # Host (numpy) arrays are refused by name, before any device work.
    pages = np.zeros((4, 16, 2, 64), np.float16)
    table = np.array([0, 1], np.int32)
    q = np.zeros((1, 4, 64), np.float32)
    with pytest.raises(kvsieve.InvalidArgumentError, match="device"):
        kvsieve.cuda_paged_decode(pages, pages, table, table[:1], np.array([3], np.int32), q, q, max_seq_len=16)
    with pytest.raises(kvsieve.InvalidArgumentError, match="v_a"):
        lse = np.zeros((1, 4), np.float32)
        kvsieve.cuda_merge_states(q, lse, q, lse, q, lse)
    with pytest.raises(kvsieve.InvalidArgumentError, match="k_pages"):
        kvsieve.cuda_paged_append(object(), pages, q, q, table)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    try:
        kvsieve.cuda_device_count()
    except kvsieve.CudaUnavailableError as e:
        pytest.skip(f"kvsieve without CUDA: {e}")
    return torch


def test_decode_append_merge_on_device_match_cpu():
    torch = _torch_cuda()
    rng = np.random.default_rng(3)
    num_pages, ps, hk, d, hq = 10, 16, 2, 64, 8
    lens = [40, 17]
    indptr = np.array([0, 3, 5], np.int32)
    indices = np.array([4, 1, 7, 0, 9], np.int32)
    last = np.array([8, 1], np.int32)
    slots = np.array([indices[indptr[b] + t // ps] * ps + t % ps for b in range(2) for t in range(lens[b])], np.int64)
    k_rows = rng.standard_normal((len(slots), hk, d)).astype(np.float32)
    v_rows = rng.standard_normal((len(slots), hk, d)).astype(np.float32)
    dev = torch.device("cuda")
    kp = torch.zeros((num_pages, ps, hk, d), dtype=torch.float16, device=dev)
    vp = torch.zeros_like(kp)
    kvsieve.cuda_paged_append(kp, vp, torch.from_numpy(k_rows).to(dev), torch.from_numpy(v_rows).to(dev), torch.from_numpy(slots).to(dev))
    torch.cuda.synchronize()
    k_host, v_host = kp.cpu().numpy(), vp.cpu().numpy()
    flat = k_host.reshape(-1, hk, d)
    np.testing.assert_array_equal(flat[slots], k_rows.astype(np.float16))

    q = rng.standard_normal((2, hq, d)).astype(np.float32)
    want, want_lse = kvsieve.paged_decode(k_host, v_host, indptr, indices, last, q)
    out = torch.full((2, hq, d), float("nan"), device=dev)
    lse = torch.full((2, hq), float("nan"), device=dev)
    t = lambda a: torch.from_numpy(a).to(dev)
    kvsieve.cuda_paged_decode(kp, vp, t(indptr), t(indices), t(last), t(q), out, lse=lse, max_seq_len=64)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4, rtol=2e-3)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse, atol=1e-3)

    sels = [kvsieve.Selection.from_heads(n, [list(range(0, n, 3)), list(range(n // 2))]) for n in lens]
    want, want_lse = kvsieve.paged_decode_sparse(k_host, v_host, indptr, indices, last, q, sels)
    lists = [sels[b].head(h) for b in range(2) for h in range(hk)]
    sel_indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int32)
    sel_indices = np.concatenate([np.asarray(x, np.int32) for x in lists]).astype(np.int32)
    out.fill_(float("nan"))
    kvsieve.cuda_paged_decode(kp, vp, t(indptr), t(indices), t(last), t(q), out, lse=lse, max_seq_len=64,
                              sel_indptr=t(sel_indptr), sel_indices=t(sel_indices), max_per_head=40)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4, rtol=2e-3)

    va, vb = rng.standard_normal((2, 3, 4, d)).astype(np.float32)
    la, lb = rng.standard_normal((2, 3, 4)).astype(np.float32)
    want, want_lse = kvsieve.merge_states(va, la, vb, lb)
    mo = torch.full((3, 4, d), float("nan"), device=dev)
    ml = torch.full((3, 4), float("nan"), device=dev)
    kvsieve.cuda_merge_states(t(va), t(la), t(vb), t(lb), mo, ml)
    torch.cuda.synchronize()
    np.testing.assert_allclose(mo.cpu().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(ml.cpu().numpy(), want_lse, atol=1e-5)
