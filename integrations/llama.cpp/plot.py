"""Decode tokens/s against context depth from `llama-kvsieve-eval bench` output (JSON lines).

Usage: python plot.py BENCH.jsonl [MORE.jsonl ...] --out speed.png [--table]

Each line with a "mode" is one (depth, mode) measurement: tok_s of every run, mean, sd.
--table prints a Markdown table (mean, min-max of the runs, ratio to the faster stock).
"""

import argparse
import json
from collections import defaultdict

LABELS = {
    "stock-fa": "stock, flash attention on",
    "stock-nofa": "stock, flash attention off",
    "dense": "kvsieve dense",
}


def label(mode):
    if mode in LABELS:
        return LABELS[mode]
    if "clusters=" in mode:
        return "kvsieve clusters 1/8"
    if "pages=" in mode:
        return "kvsieve page bounds 1/8"
    if "window=" in mode:
        return "kvsieve sinks+window 1/8"
    return mode


def load(paths):
    runs = defaultdict(dict)  # label -> depth -> record
    prefill = {}
    for p in paths:
        for line in open(p):
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if "mode" in r and "tok_s" in r:
                runs[label(r["mode"])][r["depth"]] = r
            elif "prefill_s" in r:
                prefill[r["depth"]] = r
    return runs, prefill


def table(runs):
    depths = sorted({d for m in runs.values() for d in m})
    print("| mode | " + " | ".join(f"{d // 1024}K tok/s (min-max)" for d in depths) + " |")
    print("|---|" + "---|" * len(depths))
    stock = [LABELS["stock-fa"], LABELS["stock-nofa"]]
    best_stock = {d: max((runs[m][d]["mean"] for m in stock if d in runs.get(m, {})), default=None) for d in depths}
    for name, by_depth in runs.items():
        cells = []
        for d in depths:
            r = by_depth.get(d)
            if r is None:
                cells.append("-")
                continue
            ratio = f", {r['mean'] / best_stock[d]:.2f}x" if best_stock[d] and name not in stock else ""
            cells.append(f"{r['mean']:.1f} ({r['min']:.1f}-{r['max']:.1f}{ratio})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # the untimed first decode step: it builds the cluster indexes of a clusters= policy
    print()
    print("| first decode step, s | " + " | ".join(f"{d // 1024}K" for d in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for name, by_depth in runs.items():
        print(f"| {name} | " + " | ".join(f"{by_depth[d]['first_step_s']:.2f}" if d in by_depth else "-" for d in depths) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="speed.png")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--title", default="SmolLM2-135M-Instruct Q4_1, llama.cpp, 2 threads: decode speed")
    a = ap.parse_args()
    runs, _ = load(a.files)
    if a.table:
        table(runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, by_depth in runs.items():
        ds = sorted(by_depth)
        mean = [by_depth[d]["mean"] for d in ds]
        lo = [by_depth[d]["mean"] - by_depth[d]["min"] for d in ds]
        hi = [by_depth[d]["max"] - by_depth[d]["mean"] for d in ds]
        style = "--" if name.startswith("stock") else "-"
        ax.errorbar(ds, mean, yerr=[lo, hi], fmt="o" + style, capsize=3, label=name, linewidth=1.5, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({d for m in runs.values() for d in m}))
    ax.set_xticklabels([f"{d // 1024}K" for d in sorted({d for m in runs.values() for d in m})])
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s (runs: mean, min-max)")
    ax.set_title(a.title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
