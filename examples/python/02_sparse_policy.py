"""Parse a selection policy, select tokens, decode sparse, and inspect the selection.

An engine that reads its policy from a config file does this at every decode step:

1. parse the policy text once and validate it against the model's shape;
2. per layer, let the policy choose which cached tokens each KV head reads (here: 4
   attention sinks, the last 64 tokens, and the pages whose key bounds promise the largest
   logits up to 128 tokens; layer 0 stays dense);
3. run attention over just those tokens, and look at what was kept.

At the end the sparse output is checked against attention over the selected tokens
computed directly with numpy.

Run it with the wheel installed:  python examples/python/02_sparse_policy.py
"""

import numpy as np

import kvsieve

NUM_LAYERS = 4
NUM_QO_HEADS = 8
NUM_KV_HEADS = 2
HEAD_DIM = 64
PAGE_SIZE = 16
PROMPT_LEN = 1000

POLICY_TEXT = "sinks=4, window=64, pages=128; layers=0:dense"

rng = np.random.default_rng(0)

# --- 1. The policy -------------------------------------------------------------------
policy = kvsieve.Policy(POLICY_TEXT)
policy.validate(NUM_LAYERS, NUM_KV_HEADS)
print(f"policy {POLICY_TEXT!r}")
print(f"  canonical form: {policy}")
for layer in range(2):
    print(f"  layer {layer}: dense={policy.is_dense(layer)}, head 0 reads `{policy.spec(layer, 0)}`, positions {policy.position_mode(layer)}")

# A malformed policy is reported with the byte offset of the offending token.
bad = "sinks=4,window=64,pages=lots"
try:
    kvsieve.Policy(bad)
except kvsieve.ParseError as err:
    print(f"  {bad!r} -> ParseError at byte {err.offset}:")
    print(f"    {bad}\n    {' ' * err.offset}^ {err}")

# --- 2. A cache holding a long prompt --------------------------------------------------
# Page-bound selection (pages=) ranks pages by per-channel key bounds, which the cache keeps
# up to date on every write (track_key_bounds, on by default); keys are stored after RoPE.
cache = kvsieve.KvCache(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, capacity_pages=80, dtype="f16")
seq = cache.create_sequence()
cache.append(seq, PROMPT_LEN)
for layer in range(NUM_LAYERS):
    k = rng.standard_normal((PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((PROMPT_LEN, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    cache.write(seq, layer, 0, k, v)

# --- 3. One decode step under the policy ---------------------------------------------
cache.append(seq, 1)
token = cache.seq_len(seq) - 1
for layer in range(NUM_LAYERS):
    q = rng.standard_normal((1, NUM_QO_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((1, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((1, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    cache.write(seq, layer, token, k, v)
    # One call: the policy selects, then sparse attention reads only what it selected.
    out, lse, selections = cache.decode_with_policy(layer, [seq], q, policy)
    if not selections:
        print(f"layer {layer}: dense, all {token + 1} tokens")
        continue
    # The same in two explicit steps, for an engine that wants to see or change the selection.
    sel = policy.select(cache, seq, layer, q[0])
    assert sel == selections[0]
    out2, lse2 = cache.decode_sparse(layer, [seq], q, [sel])
    assert np.array_equal(out, out2) and np.array_equal(lse, lse2)
    st = sel.stats()
    print(f"layer {layer}: {sel}")
    print(f"  kept per KV head {st['per_head']} of {st['seq_len']} tokens (density {st['density']:.3f})")

# --- 4. Inspect the last layer's selection ---------------------------------------------
for h in range(sel.num_kv_heads):
    tokens = sel.head(h)
    pages = np.unique(tokens // PAGE_SIZE)
    print(f"  KV head {h}: first tokens {tokens[:6].tolist()}, last {tokens[-3:].tolist()}, pages {pages.tolist()}")
    # Every head keeps the sinks and the window; the rest are whole pages chosen by bounds.
    assert set(range(4)) <= set(tokens.tolist()) and set(range(token + 1 - 64, token + 1)) <= set(tokens.tolist())
assert sel.head_indptr.tolist() == [0, len(sel.head(0)), len(sel)]

# --- 5. Check against numpy over exactly the selected tokens ---------------------------
keys = cache.read_keys(seq, NUM_LAYERS - 1).astype(np.float64)
values = cache.read_values(seq, NUM_LAYERS - 1).astype(np.float64)
group = NUM_QO_HEADS // NUM_KV_HEADS
err = 0.0
for h in range(NUM_QO_HEADS):
    kept = sel.head(h // group)
    scores = keys[kept, h // group] @ q[0, h].astype(np.float64) / np.sqrt(HEAD_DIM)
    p = np.exp(scores - scores.max())
    expected = p @ values[kept, h // group] / p.sum()
    err = max(err, np.abs(out[0, h] - expected).max())
print(f"max |kvsieve sparse - numpy over the selection| = {err:.2e}")
assert err < 1e-4

cache.free_sequence(seq)
cache.check_invariants()
print("ok")
