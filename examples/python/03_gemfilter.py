"""GemFilter: shrink a long prompt to the tokens an early layer points at, then answer from
those alone.

GemFilter runs the first layers of a model over the whole prompt, takes the query of the
prompt's last token at a filter layer, and keeps the k prompt tokens whose keys score
highest against it (q·k summed over the query heads, smoothed by a small average pool).
The engine then prefills only those tokens, with fresh positions, into a new sequence and
generates from it: a prompt of thousands of tokens becomes a few hundred.

There is no model here. A stand-in gives every prompt token random keys and values at each
layer (keys as the cache stores them, after RoPE) that depend on nothing but the token, so
re-prefilling a token writes the same K and V again. It hides a "needle": a short span
whose keys, from layer 1 on, line up with the question's query. Steps:

1. prefill the prompt into a cache;
2. pick the filter layer with calibrate_filter_layer (the earliest layer that finds the
   needle), then select tokens with gemfilter_select from that layer's last query;
3. re-prefill only the selected tokens into a fresh sequence (positions 0, 1, ...);
4. decode one step on the short sequence at every layer, check it against numpy attention
   over the kept tokens, and compare it with decoding over the whole prompt.

Run it with the wheel installed:  python examples/python/03_gemfilter.py
"""

import numpy as np

import kvsieve

NUM_LAYERS = 4
NUM_QO_HEADS = 8
NUM_KV_HEADS = 2
HEAD_DIM = 64
PAGE_SIZE = 16
PROMPT_LEN = 6000
NEEDLE = range(4100, 4116)
KEEP = 256  # tokens GemFilter keeps, including the forced ones below
KEEP_FIRST = 4  # attention sinks
KEEP_LAST = 32  # the question at the end of the prompt
GROUP = NUM_QO_HEADS // NUM_KV_HEADS

rng = np.random.default_rng(0)

# --- The stand-in model ------------------------------------------------------------------
# Per layer: the question's query (the prompt's last token), and every token's keys and
# values. From layer 1 on, the needle's keys point along their KV head's group of queries.
question = rng.standard_normal((NUM_LAYERS, NUM_QO_HEADS, HEAD_DIM)).astype(np.float32)
keys = rng.standard_normal((NUM_LAYERS, PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
values = rng.standard_normal((NUM_LAYERS, PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
for layer in range(1, NUM_LAYERS):
    for h in range(NUM_KV_HEADS):
        group_sum = question[layer, h * GROUP : (h + 1) * GROUP].sum(axis=0)
        keys[layer, NEEDLE.start : NEEDLE.stop, h] += 3.0 * group_sum

# --- 1. Prefill the whole prompt ---------------------------------------------------------
cache = kvsieve.KvCache(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, capacity_pages=420, dtype="f16")
dense = cache.create_sequence()
cache.append(dense, PROMPT_LEN)
for layer in range(NUM_LAYERS):
    cache.write(dense, layer, 0, keys[layer], values[layer])
print(f"prompt: {PROMPT_LEN} tokens, {cache.stats()['pages_used']} pages; needle at tokens {NEEDLE.start}..{NEEDLE.stop - 1}")

# --- 2. Filter layer and selection -------------------------------------------------------
# Calibration runs once, offline, on a prompt with a known needle: per layer, the share of
# the needle that GemFilter keeps from that layer's last query. (Here: on this prompt.)
recall = kvsieve.calibrate_filter_layer(
    [question[layer] for layer in range(NUM_LAYERS)],
    [cache.read_keys(dense, layer) for layer in range(NUM_LAYERS)],
    NEEDLE.start,
    NEEDLE.stop,
    k=KEEP,
    keep_first=KEEP_FIRST,
    keep_last=KEEP_LAST,
)
print("needle recall per layer: " + ", ".join(f"{layer}: {r:.2f}" for layer, r in enumerate(recall)))
filter_layer = int(np.flatnonzero(recall >= 0.9)[0])
print(f"filter layer {filter_layer} (the earliest that finds the needle)")

# The scores GemFilter ranks by, for a look: q·k summed over query heads, pooled.
pooled = kvsieve.avg_pool(kvsieve.gemfilter_scores(question[filter_layer], cache=cache, seq=dense, layer=filter_layer), 5)
print(f"  pooled score peaks at token {int(np.argmax(pooled))}; median {np.median(pooled):.1f}, max {pooled.max():.1f}")

kept = kvsieve.gemfilter_select(
    question[filter_layer], cache=cache, seq=dense, layer=filter_layer, k=KEEP, keep_first=KEEP_FIRST, keep_last=KEEP_LAST
)
assert len(kept) == KEEP and np.all(np.diff(kept.astype(np.int64)) > 0)
assert set(NEEDLE) <= set(kept.tolist()), "the needle was filtered out"
assert set(range(KEEP_FIRST)) | set(range(PROMPT_LEN - KEEP_LAST, PROMPT_LEN)) <= set(kept.tolist())
print(f"kept {len(kept)} of {PROMPT_LEN} tokens: first {kept[:6].tolist()}, needle kept: yes, last {kept[-3:].tolist()}")

# --- 3. Re-prefill only the kept tokens ----------------------------------------------------
short = cache.create_sequence()
cache.append(short, len(kept))  # fresh positions 0 .. len(kept) - 1
for layer in range(NUM_LAYERS):
    cache.write(short, layer, 0, keys[layer][kept], values[layer][kept])
assert cache.positions(short).tolist() == list(range(len(kept)))

# --- 4. Decode one step ------------------------------------------------------------------
# The next token's query still asks about the needle; its K and V go to both sequences.
query = (question + 0.3 * rng.standard_normal(question.shape)).astype(np.float32)
new_k = rng.standard_normal((NUM_LAYERS, 1, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
new_v = rng.standard_normal((NUM_LAYERS, 1, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
for seq in (short, dense):
    cache.append(seq, 1)
worst = 0.0
for layer in range(NUM_LAYERS):
    for seq in (short, dense):
        cache.write(seq, layer, cache.seq_len(seq) - 1, new_k[layer], new_v[layer])
    q = query[layer][None]
    out, _ = cache.decode(layer, [short], q)
    full, _ = cache.decode(layer, [dense], q)
    # numpy over the short sequence: the kept tokens and the new one.
    k = cache.read_keys(short, layer).astype(np.float64)
    v = cache.read_values(short, layer).astype(np.float64)
    for h in range(NUM_QO_HEADS):
        s = k[:, h // GROUP] @ q[0, h].astype(np.float64) / np.sqrt(HEAD_DIM)
        p = np.exp(s - s.max())
        worst = max(worst, float(np.abs(out[0, h] - p @ v[:, h // GROUP] / p.sum()).max()))
    # Layer 0 never sees the needle: its attention spreads over the whole prompt, which the
    # kept tokens do not stand for. From the filter layer on, the needle dominates both.
    rel = np.linalg.norm(out - full) / np.linalg.norm(full)
    print(f"layer {layer}: decode over {cache.seq_len(short)} tokens vs all {cache.seq_len(dense)}: relative difference {rel:.1e}")
    if layer >= filter_layer:
        assert rel < 0.05, "the filtered prompt should answer like the whole one where the needle dominates"
print(f"max |kvsieve decode - numpy over the kept tokens| = {worst:.2e}")
assert worst < 1e-4

used = cache.stats()["pages_used"]
cache.free_sequence(dense)
print(f"pages used: {used} with both sequences, {cache.stats()['pages_used']} after freeing the long one")
cache.check_invariants()
print("ok")
