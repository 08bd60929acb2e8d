"""Dense decode in torch's scaled_dot_product_attention on the data kvsieve's GPU report
dumped (benches/gpu_report.rs --dump DIR), timed on the same GPU, and kvsieve's output
checked against it.

Prints `gpu_decode_vs_torch_sdpa` (torch time / kvsieve time: above 1 means kvsieve is
faster) and `gpu_decode_max_abs_diff_vs_torch`. Exits 0 with `skipped: <reason>` when torch
or a GPU is missing.

usage: python3 scripts/gpu_sdpa.py DIR [--json PATH]
"""
import json
import sys


def main():
    d = sys.argv[1]
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"skipped: gpu_sdpa: {e}")
        return
    if not torch.cuda.is_available():
        print("skipped: gpu_sdpa: torch sees no CUDA device")
        return
    meta = json.load(open(f"{d}/meta.json"))
    n, hq, hk, hd = meta["tokens"], meta["num_qo_heads"], meta["num_kv_heads"], meta["head_dim"]
    dev = torch.device("cuda")
    q = torch.from_numpy(np.fromfile(f"{d}/q.bin", dtype=np.float32).reshape(1, hq, 1, hd)).to(dev)
    k = torch.from_numpy(np.fromfile(f"{d}/k.bin", dtype=np.float16).reshape(n, hk, hd)).to(dev)
    v = torch.from_numpy(np.fromfile(f"{d}/v.bin", dtype=np.float16).reshape(n, hk, hd)).to(dev)
    want = np.fromfile(f"{d}/out.bin", dtype=np.float32).reshape(hq, hd)
    # [1, hk, n, hd], the layout SDPA reads; the transposition is not timed.
    k = k.permute(1, 0, 2).unsqueeze(0).contiguous()
    v = v.permute(1, 0, 2).unsqueeze(0).contiguous()
    qh = q.half()

    try:
        F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)
        gqa = True
    except TypeError:
        gqa = False

    def run():
        if gqa:
            return F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)
        g = hq // hk
        return F.scaled_dot_product_attention(qh, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            run()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 20)
    torch_ms = sorted(times)[2]
    got = run().float().reshape(hq, hd).cpu().numpy()
    diff = float(np.abs(got - want).max())
    ratio = torch_ms / meta["kvsieve_ms"]
    print(f"torch {torch.__version__} SDPA (f16, {'enable_gqa' if gqa else 'K/V repeated per group'}): {torch_ms:.4f} ms, "
          f"kvsieve {meta['kvsieve_ms']:.4f} ms at {n} tokens")
    print(f"gpu_decode_vs_torch_sdpa = {ratio:.4f}")
    print(f"gpu_decode_max_abs_diff_vs_torch = {diff:.6f}")
    if out_json:
        json.dump({"gpu_decode_vs_torch_sdpa": ratio, "gpu_decode_max_abs_diff_vs_torch": diff, "torch_sdpa_ms": torch_ms}, open(out_json, "w"), indent=1)
    if diff > 2e-2:
        print(f"error: kvsieve's output differs from torch's by {diff}")
        sys.exit(1)


main()
