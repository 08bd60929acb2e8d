"""decode_vs_numpy: numpy's time for the dense decode kvsieve runs, over kvsieve's time,
measured in one process on the same data.

Shape: f16 storage, head_dim 128, 8 KV heads, 32 query heads, page size 16, batch 8.
numpy gets its best case: K and V already converted to float32, K laid out as
[kv_heads, head_dim, tokens] and V as [kv_heads, tokens, head_dim] (both contiguous), so
each step is two batched BLAS matrix products and a softmax. kvsieve reads its f16 pages through the Python binding (cache.decode).
"""
import argparse
import json
import time

import numpy as np

import kvsieve


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    hk, hq, d, ps = 8, 32, 128, 16
    g = hq // hk
    rng = np.random.default_rng(0)
    cache = kvsieve.KvCache(1, hk, d, ps, a.batch * (a.tokens // ps + 1), dtype="f16", track_key_bounds=False)
    ks, vs, ids = [], [], []
    for _ in range(a.batch):
        k = rng.standard_normal((a.tokens, hk, d), dtype=np.float32).astype(np.float16)
        v = rng.standard_normal((a.tokens, hk, d), dtype=np.float32).astype(np.float16)
        sid = cache.create_sequence()
        cache.append(sid, a.tokens)
        cache.write(sid, 0, 0, k, v)
        ids.append(sid)
        # numpy's copies: float32, K as [hk, d, tokens], V as [hk, tokens, d]
        ks.append(np.ascontiguousarray(k.astype(np.float32).transpose(1, 2, 0)))
        vs.append(np.ascontiguousarray(v.astype(np.float32).transpose(1, 0, 2)))
    q = rng.standard_normal((a.batch, hq, d), dtype=np.float32)
    scale = 1.0 / np.sqrt(d)

    def numpy_decode():
        outs = []
        for b in range(a.batch):
            qb = q[b].reshape(hk, g, d) * scale
            s = np.matmul(qb, ks[b])  # [hk, g, tokens]
            m = s.max(axis=-1, keepdims=True)
            p = np.exp(s - m)
            l = p.sum(axis=-1, keepdims=True)
            outs.append((np.matmul(p, vs[b]) / l).reshape(hq, d))
        return np.stack(outs)

    def kvsieve_decode():
        return cache.decode(0, ids, q)

    ref = numpy_decode()
    out, _ = kvsieve_decode()
    err = float(np.abs(out - ref).max())
    assert err < 1e-3, f"kvsieve and numpy disagree: max error {err}"
    t_np = median_time(numpy_decode, 5)
    t_kv = median_time(kvsieve_decode, 9)
    ratio = t_np / t_kv
    print(f"numpy {t_np*1e3:.2f} ms, kvsieve {t_kv*1e3:.2f} ms per step "
          f"(batch {a.batch}, {a.tokens} tokens): numpy/kvsieve = {ratio:.2f}, max |diff| {err:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"decode_vs_numpy": round(ratio, 4), "decode_numpy_ms": round(t_np * 1e3, 4),
                       "decode_kvsieve_py_ms": round(t_kv * 1e3, 4)}, f)


if __name__ == "__main__":
    main()
