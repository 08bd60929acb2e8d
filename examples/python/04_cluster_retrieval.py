"""Centroid retrieval (Squeezed Attention): cluster a long context's keys once, then let each
decode query read only the clusters it needs, plus a local window.

Per KV head, ClusterIndex.build runs K-means over the keys (by cosine) and keeps each
cluster's mean key, size and member tokens. For a decode query, every cluster gets an
estimate of the attention one of its keys receives, from the query's logits against the
centroids; the clusters above a threshold (calibrated for a target fraction of the keys) or
the best clusters up to a token budget become a Selection. The last tokens, left out of the
clustering, are read through a sinks + window selection united with it.

There is no model here. A stand-in gives the context keys drawn around a few hundred
"topics" per KV head (as real keys cluster) and random values; each decode query leans
towards a few topics. Steps:

1. prefill the context into a cache and build the index from the cache's keys;
2. calibrate a threshold that keeps 10% of the clustered keys on calibration queries;
3. retrieve for a fresh query, unite with the window, decode over the selection, and check
   the result against numpy attention over the same tokens and against dense attention;
4. the same with a token budget, flat and through the coarse level (fewer centroids scored);
5. append tokens and assign them to their clusters; save the index, load it back.

Run it with the wheel installed:  python examples/python/04_cluster_retrieval.py
"""

import os
import tempfile

import numpy as np

import kvsieve

NUM_QO_HEADS = 8
NUM_KV_HEADS = 2
HEAD_DIM = 64
PAGE_SIZE = 16
CONTEXT = 8000
TOPICS = 200
WINDOW = 64  # the last tokens: out of the clusters, read by the window selection
SINKS = 4
EXTRA = 400  # tokens appended after the index is built
GROUP = NUM_QO_HEADS // NUM_KV_HEADS

rng = np.random.default_rng(0)

# --- The stand-in model ------------------------------------------------------------------
topics = 1.5 * rng.standard_normal((NUM_KV_HEADS, TOPICS, HEAD_DIM))
topic_of = rng.integers(0, TOPICS, (CONTEXT, NUM_KV_HEADS))


def make_keys(n, first):
    k = np.empty((n, NUM_KV_HEADS, HEAD_DIM))
    for h in range(NUM_KV_HEADS):
        k[:, h] = topics[h, topic_of[first : first + n, h]] + 0.4 * rng.standard_normal((n, HEAD_DIM))
    return k.astype(np.float32)


def make_query():
    """A decode query leaning towards a few topics of each KV head."""
    q = 0.3 * rng.standard_normal((NUM_QO_HEADS, HEAD_DIM))
    for h in range(NUM_KV_HEADS):
        for t in rng.integers(0, TOPICS, 3):
            q[h * GROUP : (h + 1) * GROUP] += 0.6 * topics[h, t]
    return q.astype(np.float32)


def attention(q, k, v, tokens_per_head):
    """numpy attention of one query [Hq, D] over the listed tokens of each KV head."""
    out = np.zeros(q.shape)
    for j in range(NUM_QO_HEADS):
        t = tokens_per_head[j // GROUP]
        s = k[t, j // GROUP].astype(np.float64) @ q[j] / np.sqrt(HEAD_DIM)
        p = np.exp(s - s.max())
        out[j] = p @ v[t, j // GROUP] / p.sum()
    return out


# --- 1. Prefill and cluster ----------------------------------------------------------------
keys = make_keys(CONTEXT, 0)
values = rng.standard_normal((CONTEXT, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
cache = kvsieve.KvCache(1, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, capacity_pages=(CONTEXT + EXTRA) // PAGE_SIZE + 8, dtype="f32")
seq = cache.create_sequence()
cache.append(seq, CONTEXT)
cache.write(seq, 0, 0, keys, values)
index = kvsieve.ClusterIndex.build(cache=cache, seq=seq, layer=0, clusters=0.05, exclude_window=WINDOW, coarse=0.1, seed=1)
print(f"context: {CONTEXT} tokens; {index.num_clusters} clusters and {index.num_coarse_clusters} coarse clusters per KV head")
print(f"clustered tokens: 0..{index.clustered_len}; converged: {[index.diagnostics(h)['converged'] for h in range(NUM_KV_HEADS)]}")

# --- 2. Calibrate ------------------------------------------------------------------------
calibration = np.stack([make_query() for _ in range(32)])
thresholds = index.calibrate(calibration, target_fraction=0.1)
print(f"threshold {thresholds.per_head[0]:.3e} keeps {thresholds.mean_kept_fraction():.3f} of the clustered keys (target 0.1)")
assert abs(thresholds.mean_kept_fraction() - 0.1) < 0.02

# --- 3. Retrieve, unite with the window, decode --------------------------------------------
q = make_query()
window = kvsieve.streaming(NUM_KV_HEADS, CONTEXT, SINKS, WINDOW)
retrieved, stats = index.retrieve(q, threshold=thresholds)
sel = retrieved.union(window)
out, _ = cache.decode_sparse(0, [seq], q[None], [sel])
heads = [sel.head(h) for h in range(NUM_KV_HEADS)]
want = attention(q, keys, values, heads)
assert np.allclose(out[0], want, atol=1e-4)
dense_out, _ = cache.decode(0, [seq], q[None])
rel = np.linalg.norm(out[0] - dense_out[0]) / np.linalg.norm(dense_out[0])
print(f"threshold retrieval: {stats['tokens_kept']} tokens per KV head ({sel.stats()['density']:.3f} of the context with the window), "
      f"{stats['centroid_evals']} centroid evaluations; relative error vs dense attention {rel:.3f}")
assert rel < 0.2

# --- 4. Token budgets, flat and hierarchical -----------------------------------------------
flat, fs = index.retrieve(q, budget=512)
hier, hs = index.retrieve(q, budget=512, hierarchical=True, coarse_budget_multiple=2.0)
assert fs["tokens_kept"] == hs["tokens_kept"] == [512] * NUM_KV_HEADS
overlap = len(np.intersect1d(flat.head(0), hier.head(0))) / 512
print(f"budget 512: flat scores {fs['centroid_evals']} centroids, hierarchical {hs['centroid_evals']} "
      f"(opened {hs['coarse_kept']} coarse clusters); {overlap:.2f} of head 0's tokens in common")
assert hs["centroid_evals"] < fs["centroid_evals"]
for sel_b in (flat, hier):
    o, _ = cache.decode_sparse(0, [seq], q[None], [sel_b.union(window)])
    assert np.linalg.norm(o[0] - dense_out[0]) / np.linalg.norm(dense_out[0]) < 0.3

# --- 5. New tokens; save and load ----------------------------------------------------------
topic_of = np.concatenate([topic_of, rng.integers(0, TOPICS, (EXTRA, NUM_KV_HEADS))])
cache.append(seq, EXTRA)
cache.write(seq, 0, CONTEXT, make_keys(EXTRA, CONTEXT), rng.standard_normal((EXTRA, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32))
assigned = index.assign_new(cache=cache, seq=seq, layer=0)
print(f"appended {EXTRA} tokens: {assigned} assigned to existing clusters; clustered tokens now 0..{index.clustered_len}")
assert assigned == EXTRA and index.clustered_len == CONTEXT + EXTRA - WINDOW
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "layer0.safetensors")
    index.save(path)
    loaded = kvsieve.ClusterIndex.load_for(path, cache=cache, seq=seq, layer=0)
    print(f"saved and loaded: {os.path.getsize(path)} bytes")
assert loaded.retrieve(q, budget=512) == index.retrieve(q, budget=512)
print("ok")
