"""faiss-cpu's K-means on the keys that `benches/kmeans.rs` writes, for the figures
`kmeans_time_vs_faiss` and `kmeans_inertia_vs_faiss`.

Normally run by the Rust bench (`cargo bench --bench kmeans -- --json PATH`), which writes
`target/bench/kmeans_keys.npy` (`[heads, tokens, head_dim]` float32), clusters it itself,
then calls this script with the same cluster count, iterations, seed and thread count and
divides. By hand, after the bench has written the keys:

    .venv/bin/python benches/kmeans_faiss.py --keys target/bench/kmeans_keys.npy \
        --clusters 1638 --iters 20 --threads 2 --json target/bench/kmeans_faiss_raw.json

Per head: keys L2-normalised, `faiss.Kmeans(d, k, niter, seed, spherical=True)` trained on
them (the time summed over heads is `faiss_seconds`), then every key is assigned to its
nearest final centroid with an exact L2 search; `faiss_inertia` is the sum over heads of
the squared distances, the same definition kvsieve reports (`Σ ‖x̂ − ĉ‖²` over unit keys
and unit centroids).
"""

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", required=True, help=".npy of shape [heads, tokens, head_dim], float32")
    ap.add_argument("--clusters", type=int, required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="OpenMP threads (0: faiss's default)")
    ap.add_argument("--json", help="write {faiss_seconds, faiss_inertia, ...} here")
    args = ap.parse_args()

    import faiss

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    keys = np.load(args.keys)
    if keys.ndim != 3:
        raise SystemExit(f"--keys: expected [heads, tokens, head_dim], got shape {keys.shape}")
    heads, n, d = keys.shape
    seconds = 0.0
    inertia = 0.0
    for h in range(heads):
        x = keys[h].astype(np.float32)
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        x = np.ascontiguousarray(np.where(norms > 0, x / np.maximum(norms, 1e-300), 0.0).astype(np.float32))
        km = faiss.Kmeans(d, args.clusters, niter=args.iters, seed=args.seed, spherical=True, verbose=False)
        t = time.perf_counter()
        km.train(x)
        seconds += time.perf_counter() - t
        index = faiss.IndexFlatL2(d)
        index.add(km.centroids)
        dist, _ = index.search(x, 1)
        inertia += float(dist.astype(np.float64).sum())
    out = {
        "faiss_seconds": seconds,
        "faiss_inertia": inertia,
        "heads": heads,
        "tokens": n,
        "head_dim": d,
        "clusters": args.clusters,
        "iters": args.iters,
        "threads": faiss.omp_get_max_threads(),
        "faiss_version": faiss.__version__,
    }
    print(f"faiss {faiss.__version__}: {heads} heads x {n} x {d}, {args.clusters} clusters, "
          f"{args.iters} iterations, {out['threads']} threads: {seconds:.2f} s, inertia {inertia:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
