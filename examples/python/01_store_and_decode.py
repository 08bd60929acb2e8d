"""Store a prompt's KV in a kvsieve cache, then decode one token.

This is the loop an inference engine runs for every request, shown for one layer stack
with random numbers standing in for the model's projections:

1. prefill: the prompt's tokens get slots in the cache, and each layer writes their keys
   and values there; attention of the prompt over itself runs on the cache;
2. decode: one new token gets a slot, each layer writes its K/V, and attention of its
   query over every cached token gives the layer's output.

At the end the decode output is checked against attention computed directly with numpy.

Run it with the wheel installed:  python examples/python/01_store_and_decode.py
"""

import numpy as np

import kvsieve

# A small Llama-like shape: grouped-query attention with 8 query heads sharing 2 KV heads.
NUM_LAYERS = 4
NUM_QO_HEADS = 8
NUM_KV_HEADS = 2
HEAD_DIM = 64
PAGE_SIZE = 16
PROMPT_LEN = 50

rng = np.random.default_rng(0)


def projections(n):
    """Stand-ins for the model's q/k/v projections of n tokens (RoPE already applied)."""
    q = rng.standard_normal((n, NUM_QO_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    return q, k, v


# The cache owns a fixed pool of pages shared by every sequence. Each page holds
# PAGE_SIZE tokens' K and V for all layers and KV heads, stored here as float16.
cache = kvsieve.KvCache(
    num_layers=NUM_LAYERS,
    num_kv_heads=NUM_KV_HEADS,
    head_dim=HEAD_DIM,
    page_size=PAGE_SIZE,
    capacity_pages=64,
    dtype="f16",
)
print(f"kvsieve {kvsieve.__version__}, CPU kernels: {kvsieve.isa()}")
print(cache.config)

# --- Prefill -------------------------------------------------------------------------
seq = cache.create_sequence()

# Reserve slots for the prompt. Positions default to 0, 1, 2, ...; the returned slot
# mapping (page * page_size + offset per token) is what vLLM-style engines use.
slots = cache.append(seq, PROMPT_LEN)
print(f"prompt of {PROMPT_LEN} tokens -> pages {cache.seq_pages(seq).tolist()}, first slots {slots[:4].tolist()}")

# Each layer writes the prompt's K/V, then runs causal attention of the prompt's queries
# over the cache. qo_indptr says which query rows belong to which sequence (one here).
for layer in range(NUM_LAYERS):
    q, k, v = projections(PROMPT_LEN)
    cache.write(seq, layer, 0, k, v)
    out, lse = cache.prefill(layer, [seq], q, qo_indptr=[0, PROMPT_LEN], causal=True)
print(f"prefill done: out {out.shape}, lse {lse.shape}")

# --- Decode one token ----------------------------------------------------------------
# The new token gets the next slot (position PROMPT_LEN); every layer writes its K/V
# and then attends over all PROMPT_LEN + 1 cached tokens.
cache.append(seq, 1)
new_token = cache.seq_len(seq) - 1
for layer in range(NUM_LAYERS):
    q, k, v = projections(1)
    cache.write(seq, layer, new_token, k, v)
    # q is [batch, num_qo_heads, head_dim]: one query token per sequence in the batch.
    out, lse = cache.decode(layer, [seq], q)

print(f"decode done: out {out.shape} {out.dtype}, lse {lse.shape}")
print(f"positions now end at {cache.positions(seq)[-3:].tolist()}; stats: {cache.stats()}")

# --- Check the last layer's decode against plain numpy -------------------------------
# The cache stores float16, so compare against the keys and values as stored.
keys = cache.read_keys(seq, NUM_LAYERS - 1).astype(np.float64)
values = cache.read_values(seq, NUM_LAYERS - 1).astype(np.float64)
group = NUM_QO_HEADS // NUM_KV_HEADS
expected = np.empty((NUM_QO_HEADS, HEAD_DIM))
for h in range(NUM_QO_HEADS):
    scores = keys[:, h // group] @ q[0, h].astype(np.float64) / np.sqrt(HEAD_DIM)
    p = np.exp(scores - scores.max())
    expected[h] = p @ values[:, h // group] / p.sum()
err = np.abs(out[0] - expected).max()
print(f"max |kvsieve - numpy| = {err:.2e}")
assert err < 1e-4

cache.free_sequence(seq)
cache.check_invariants()
print("ok")
