"""The CUDA entry points: errors everywhere; with torch and a GPU (and a wheel built with
the ``cuda`` feature), decode, sparse decode, append and merge_states on device tensors
against the CPU functions."""

import os

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
    if os.environ.get("KVSIEVE_CUDA_EMU") == "1":
        # scripts/cuda-emu.sh: device arrays in the CPU emulator's memory (see emu_torch.py).
        import emu_torch

        return emu_torch
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


def test_selection_and_prefill_refuse_host_arrays_by_name():
    pages = np.zeros((4, 16, 2, 64), np.float16)
    table = np.array([0, 1], np.int32)
    q = np.zeros((1, 4, 64), np.float32)
    sel = np.zeros(8, np.int32)
    with pytest.raises(kvsieve.InvalidArgumentError, match="device"):
        kvsieve.cuda_update_key_bounds(pages, pages, pages, np.zeros((1, 4), np.int32))
    with pytest.raises(kvsieve.ShapeError, match="entries"):
        kvsieve.cuda_update_key_bounds(pages, pages, pages, np.zeros((1, 3), np.int32))
    with pytest.raises(kvsieve.InvalidArgumentError, match="device"):
        kvsieve.cuda_page_bounds(pages, pages, table, table[:1], np.array([3], np.int32), pages, q, sel, sel,
                                 max_seq_len=16, budget_tokens=16)
    with pytest.raises(kvsieve.ShapeError, match="qo_indptr"):
        kvsieve.cuda_paged_prefill(pages, pages, table, table[:1], np.array([3], np.int32), q, [0, 1, 2], q)
    with pytest.raises(kvsieve.InvalidArgumentError, match="sel_indices"):
        kvsieve.cuda_paged_prefill(pages, pages, table, table[:1], np.array([3], np.int32), q, [0, 1], q, sel_indptr=sel)
    with pytest.raises(kvsieve.InvalidArgumentError, match="windows"):
        kvsieve.cuda_paged_prefill(pages, pages, table, table[:1], np.array([3], np.int32), q, [0, 1], q, windows=[(1, 2, 3)])
    with pytest.raises(kvsieve.InvalidArgumentError, match="q"):
        kvsieve.cuda_gemfilter_select(q[0], pages[0], sel, k=4)
    with pytest.raises(kvsieve.ShapeError, match="indices"):
        kvsieve.cuda_gemfilter_select(q[0], pages[0], sel, k=16)
    with pytest.raises(kvsieve.InvalidArgumentError, match="keys"):
        kvsieve.CudaClusterIndex.build(np.zeros((32, 2, 64), np.float32), clusters=4)
    with pytest.raises(kvsieve.OutOfRangeError, match="clusters"):
        kvsieve.CudaClusterIndex.build(np.zeros((32, 2, 64), np.float32), clusters=-1)
    rng = np.random.default_rng(0)
    index = kvsieve.ClusterIndex.build(rng.standard_normal((64, 2, 64)).astype(np.float32), clusters=4)
    try:
        kvsieve.CudaClusterIndex.upload(index)
    except kvsieve.CudaUnavailableError as e:
        assert e.code == kvsieve.ErrorCode.CUDA_UNAVAILABLE


def test_page_bounds_prefill_gemfilter_and_retrieval_on_device_match_cpu():
    torch = _torch_cuda()
    dev = torch.device("cuda")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    rng = np.random.default_rng(11)
    num_pages, ps, hk, d, hq = 12, 16, 2, 64, 8
    lens = [70, 33]
    indptr = np.array([0, 5, 8], np.int32)
    indices = np.array([3, 0, 7, 9, 1, 4, 11, 2], np.int32)
    last = np.array([lens[0] - 4 * ps, lens[1] - 2 * ps], np.int32)
    kp_h = rng.standard_normal((num_pages, ps, hk, d)).astype(np.float16)
    vp_h = rng.standard_normal((num_pages, ps, hk, d)).astype(np.float16)
    kp, vp = t(kp_h), t(vp_h)

    # Key bounds over every written slot, then page-bound selection against a numpy ranking.
    entries = []
    for b in range(2):
        pages = indices[indptr[b]:indptr[b + 1]]
        for i, p in enumerate(pages):
            n = ps if i + 1 < len(pages) else int(last[b])
            mask = (1 << n) - 1
            entries.append([p, 1, mask & 0xFFFFFFFF, (mask >> 32) & 0xFFFFFFFF])
    ent = np.array(entries, np.int64).astype(np.uint32).view(np.int32).reshape(-1, 4)
    bounds = torch.zeros((num_pages, hk, 2, d), dtype=torch.float16, device=dev)
    kvsieve.cuda_update_key_bounds(kp, vp, bounds, t(ent))
    torch.cuda.synchronize()
    bh = bounds.cpu().numpy().astype(np.float32)
    for b in range(2):
        pages = indices[indptr[b]:indptr[b + 1]]
        for i, p in enumerate(pages):
            n = ps if i + 1 < len(pages) else int(last[b])
            keys = kp_h[p, :n].astype(np.float32)
            np.testing.assert_array_equal(bh[p, :, 0], keys.min(axis=0))
            np.testing.assert_array_equal(bh[p, :, 1], keys.max(axis=0))
    q = rng.standard_normal((2, hq, d)).astype(np.float32)
    max_len = 80
    sel_ip = torch.zeros(2 * hk + 1, dtype=torch.int32, device=dev)
    sel_ix = torch.full((2 * hk * max_len,), -1, dtype=torch.int32, device=dev)
    budget = 32
    kvsieve.cuda_page_bounds(kp, vp, t(indptr), t(indices), t(last), bounds, t(q), sel_ip, sel_ix,
                             max_seq_len=max_len, budget_tokens=budget)
    torch.cuda.synchronize()
    ip_h, ix_h = sel_ip.cpu().numpy(), sel_ix.cpu().numpy()
    group = hq // hk
    for b in range(2):
        pages = indices[indptr[b]:indptr[b + 1]]
        for h in range(hk):
            qs = q[b, h * group:(h + 1) * group]
            ub = [max(np.maximum(qj * bh[p, h, 0], qj * bh[p, h, 1]).sum() for qj in qs) for p in pages]
            order = sorted(range(len(pages)), key=lambda i: (-ub[i], i))
            kept, n_kept = [], 0
            for i in order:
                if n_kept >= budget:
                    break
                n = ps if i + 1 < len(pages) else int(last[b])
                kept.extend(range(i * ps, i * ps + n))
                n_kept += n
            got = ix_h[ip_h[b * hk + h]:ip_h[b * hk + h + 1]]
            np.testing.assert_array_equal(got, np.array(sorted(kept), np.int32))

    # Prefill: the last 9 and 5 tokens of each sequence, with a window on head 0.
    qo = [0, 9, 14]
    qp = rng.standard_normal((14, hq, d)).astype(np.float16)
    wins = [(2, 8), None]
    sels = [kvsieve.Selection.dense(hk, n) for n in lens]
    want, want_lse = kvsieve.paged_prefill_sparse(kp_h, vp_h, indptr, indices, last, qp.astype(np.float32),
                                                  np.array(qo, np.int32), sels, wins)
    out = torch.full((14, hq, d), float("nan"), dtype=torch.float16, device=dev)
    lse = torch.full((14, hq), float("nan"), device=dev)
    kvsieve.cuda_paged_prefill(kp, vp, t(indptr), t(indices), t(last), t(qp), qo, out, windows=wins, lse=lse)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.float().cpu().numpy(), want, atol=4e-3, rtol=4e-3)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse, atol=2e-3)

    # GemFilter against the host selection.
    keys = rng.standard_normal((200, hk, d)).astype(np.float32)
    qg = rng.standard_normal((hq, d)).astype(np.float32)
    want = kvsieve.gemfilter_select(qg, keys, k=24, keep_first=2, keep_last=3)
    got = torch.full((24,), -1, dtype=torch.int32, device=dev)
    kvsieve.cuda_gemfilter_select(t(qg), t(keys), got, k=24, keep_first=2, keep_last=3)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(got.cpu().numpy(), want.astype(np.int32))

    # Centroid retrieval: a host index uploaded, then a device build, against host retrieval.
    index = kvsieve.ClusterIndex.build(keys, clusters=16, seed=5, coarse=4)
    dindex = kvsieve.CudaClusterIndex.upload(index)
    assert (dindex.num_kv_heads, dindex.num_clusters, dindex.clustered_len) == (hk, 16, 200)
    r_ip = torch.zeros(hk + 1, dtype=torch.int32, device=dev)
    r_ix = torch.full((hk * 200,), -1, dtype=torch.int32, device=dev)
    for kwargs in [
        dict(budget=40),
        dict(budget=40, hierarchical=True, coarse_budget_multiple=2.0),
        dict(budget=40, rank="mixed"),
        dict(budget=40, hierarchical=True, coarse_budget=80, rank="mixed"),
    ]:
        sel, _ = index.retrieve(qg, **kwargs)
        dindex.retrieve(t(qg), r_ip, r_ix, **kwargs)
        torch.cuda.synchronize()
        ip_h, ix_h = r_ip.cpu().numpy(), r_ix.cpu().numpy()
        for h in range(hk):
            np.testing.assert_array_equal(ix_h[ip_h[h]:ip_h[h + 1]], np.asarray(sel.head(h), np.int32), err_msg=str(kwargs))
    host, dbuilt = kvsieve.CudaClusterIndex.build(t(keys), clusters=16, seed=5)
    assert host.num_clusters == 16 and dbuilt.clustered_len == 200
    assert int(np.sum(host.sizes(0))) == 200


def test_device_cache_checks_arguments_and_reports_a_missing_gpu():
    with pytest.raises(kvsieve.InvalidArgumentError, match="dtype"):
        kvsieve.CudaKvCache(2, 2, 64, 16, 8, dtype="int8")
    with pytest.raises(kvsieve.OutOfRangeError, match="num_layers"):
        kvsieve.CudaKvCache(-1, 2, 64, 16, 8)
    try:
        cache = kvsieve.CudaKvCache(2, 2, 64, 16, 8)
    except kvsieve.CudaUnavailableError as e:
        assert e.code == kvsieve.ErrorCode.CUDA_UNAVAILABLE
    else:
        assert cache.create_sequence() == 0


def test_device_cache_decode_matches_host_cache():
    torch = _torch_cuda()
    rng = np.random.default_rng(5)
    layers, hk, d, ps, hq = 2, 2, 64, 16, 4
    dev = torch.device("cuda")
    gpu = kvsieve.CudaKvCache(layers, hk, d, ps, 32)
    cpu = kvsieve.KvCache(layers, hk, d, ps, 32)
    a, ha = gpu.create_sequence(), cpu.create_sequence()
    n = 40
    np.testing.assert_array_equal(gpu.append(a, n), cpu.append(ha, n))
    for layer in range(layers):
        k = rng.standard_normal((n, hk, d)).astype(np.float32)
        v = rng.standard_normal((n, hk, d)).astype(np.float32)
        cpu.write(ha, layer, 0, k, v)
        if layer == 0:
            gpu.write(a, layer, 0, k, v)
        else:
            gpu.write(a, layer, 0, torch.from_numpy(k).to(dev), torch.from_numpy(v).to(dev))
    b, hb = gpu.fork(a), cpu.fork(ha)
    keep = np.arange(0, n, 3, dtype=np.uint32)
    gpu.compact(b, keep)
    cpu.compact(hb, keep)
    assert gpu.seq_len(b) == cpu.seq_len(hb) == len(keep)
    q = rng.standard_normal((2, hq, d)).astype(np.float32)
    for layer in range(layers):
        want, want_lse = cpu.decode(layer, [ha, hb], q)
        out = torch.full((2, hq, d), float("nan"), device=dev)
        lse = torch.full((2, hq), float("nan"), device=dev)
        gpu.decode(layer, [a, b], torch.from_numpy(q).to(dev), out, lse=lse)
        np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4, rtol=2e-3)
        np.testing.assert_allclose(lse.cpu().numpy(), want_lse, atol=1e-3)


def test_device_cache_sparse_decode_and_host_side_checks():
    torch = _torch_cuda()
    rng = np.random.default_rng(9)
    hk, d, ps, hq = 2, 64, 16, 4
    dev = torch.device("cuda")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    gpu = kvsieve.CudaKvCache(1, hk, d, ps, 16)
    cpu = kvsieve.KvCache(1, hk, d, ps, 16)
    lens = [37, 20]
    ids = [(gpu.create_sequence(), cpu.create_sequence()) for _ in lens]
    for (a, b), n in zip(ids, lens):
        np.testing.assert_array_equal(gpu.append(a, n), cpu.append(b, n))
        k = rng.standard_normal((n, hk, d)).astype(np.float32)
        v = rng.standard_normal((n, hk, d)).astype(np.float32)
        gpu.write(a, 0, 0, k, v)
        cpu.write(b, 0, 0, k, v)
    q = rng.standard_normal((2, hq, d)).astype(np.float32)
    sels = [kvsieve.Selection.from_heads(n, [list(range(0, n, 2)), list(range(n - 5, n))]) for n in lens]
    want, want_lse = cpu.decode_sparse(0, [b for _, b in ids], q, sels)
    lists = [s.head(h) for s in sels for h in range(hk)]
    sel_indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int32)
    sel_indices = np.concatenate([np.asarray(x, np.int32) for x in lists])
    out = torch.full((2, hq, d), float("nan"), device=dev)
    lse = torch.full((2, hq), float("nan"), device=dev)
    # scale=0 means the default 1/sqrt(head_dim) on the device calls.
    gpu.decode(0, [a for a, _ in ids], t(q), out, lse=lse, sel_indptr=t(sel_indptr), sel_indices=t(sel_indices),
               max_per_head=max(lens), scale=0.0)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4, rtol=2e-3)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse, atol=1e-3)

    with pytest.raises(kvsieve.UnknownSequenceError):
        gpu.decode(0, [99], t(q[:1]), torch.zeros((1, hq, d), device=dev))
    with pytest.raises(kvsieve.InvalidArgumentError, match="keep"):
        gpu.compact(ids[0][0], [[0, 1], [0, 1]], per="layer")
    # A window of 0 tokens is no window, and then takes no sinks.
    pages = torch.zeros((4, ps, hk, d), dtype=torch.float16, device=dev)
    table = (t(np.array([0, 1], np.int32)), t(np.array([0], np.int32)), t(np.array([3], np.int32)))
    qp, op = t(np.zeros((1, hq, d), np.float16)), torch.zeros((1, hq, d), dtype=torch.float16, device=dev)
    kvsieve.cuda_paged_prefill(pages, pages, *table, qp, [0, 1], op, windows=[(0, 0), None])
    with pytest.raises(kvsieve.InvalidArgumentError, match=r"windows\[0\]\.sinks"):
        kvsieve.cuda_paged_prefill(pages, pages, *table, qp, [0, 1], op, windows=[(3, 0), None])
    with pytest.raises(kvsieve.ShapeError, match="windows"):
        kvsieve.cuda_paged_prefill(pages, pages, *table, qp, [0, 1], op, windows=[None])
    # Hierarchical retrieval needs an index with a coarse level.
    keys = rng.standard_normal((64, hk, d)).astype(np.float32)
    flat = kvsieve.CudaClusterIndex.upload(kvsieve.ClusterIndex.build(keys, clusters=8))
    r_ip, r_ix = torch.zeros(hk + 1, dtype=torch.int32, device=dev), torch.zeros(hk * 64, dtype=torch.int32, device=dev)
    with pytest.raises(kvsieve.InvalidArgumentError, match="hierarchical"):
        flat.retrieve(t(q[0]), r_ip, r_ix, budget=8, hierarchical=True, coarse_budget=16)
