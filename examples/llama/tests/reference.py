"""An independent numpy forward pass of a Llama GGUF model, written from the Hugging Face
Llama definition: the GGUF reader and dequantisation of the `gguf` package, the Q/K weights
un-permuted back to Hugging Face's order and RoPE applied in its half-split form
(`rotate_half`), float32 throughout, full causal attention with no KV cache.

    python reference.py MODEL.gguf ppl TOKENS_FILE       -> {"perplexity": ...}
    python reference.py MODEL.gguf tokenize TEXT_FILE    -> [ids] (Hugging Face `tokenizers`)
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def weights(reader):
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim > 1 or len(t.shape) > 1 else w
    return out


def unpermute(w, n_head):
    """Undo llama.cpp's conversion permutation of Q/K rows (adjacent pairs -> halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_half(x, pos, theta):
    """Hugging Face RoPE: x [n, heads, d], channel i pairs with i + d/2."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], axis=-1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], axis=-1)).astype(np.float32)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rot * sin


def logits_of(reader, tokens):
    arch = field(reader, "general.architecture")
    n_layer = int(field(reader, f"{arch}.block_count"))
    n_head = int(field(reader, f"{arch}.attention.head_count"))
    n_kv = int(field(reader, f"{arch}.attention.head_count_kv"))
    eps = float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon"))
    theta = float(field(reader, f"{arch}.rope.freq_base"))
    W = weights(reader)
    emb = W["token_embd.weight"]
    d_model = emb.shape[1]
    hd = d_model // n_head
    n = len(tokens)
    pos = np.arange(n)
    x = emb[np.array(tokens)]
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(n_layer):
        p = f"blk.{l}."
        h = rms_norm(x, W[p + "attn_norm.weight"], eps)
        q = (h @ unpermute(W[p + "attn_q.weight"], n_head).T).reshape(n, n_head, hd)
        k = (h @ unpermute(W[p + "attn_k.weight"], n_kv).T).reshape(n, n_kv, hd)
        v = (h @ W[p + "attn_v.weight"].T).reshape(n, n_kv, hd)
        q, k = rope_half(q, pos, theta), rope_half(k, pos, theta)
        g = n_head // n_kv
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
        att = np.empty((n, n_head, hd), dtype=np.float32)
        for hh in range(n_head):
            s = (q[:, hh, :] @ k[:, hh, :].T) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            att[:, hh, :] = s @ v[:, hh, :]
        x = x + att.reshape(n, d_model) @ W[p + "attn_output.weight"].T
        h = rms_norm(x, W[p + "ffn_norm.weight"], eps)
        gate = h @ W[p + "ffn_gate.weight"].T
        up = h @ W[p + "ffn_up.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ W[p + "ffn_down.weight"].T
    x = rms_norm(x, W["output_norm.weight"], eps)
    out = W.get("output.weight", emb)
    return x @ out.T


def perplexity(reader, tokens):
    logits = logits_of(reader, tokens).astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    nll = lse[:-1] - logits[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def tokenize(reader, text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    toks = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type")
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([t for t, ty in zip(toks, types) if ty == 3])
    return tk.encode(text).ids


def main():
    reader = GGUFReader(sys.argv[1])
    what, path = sys.argv[2], sys.argv[3]
    if what == "ppl":
        tokens = np.array([int(t) for t in open(path).read().split()])
        print(json.dumps({"perplexity": perplexity(reader, tokens), "tokens": len(tokens)}))
    elif what == "tokenize":
        print(json.dumps(tokenize(reader, open(path, encoding="utf-8").read())))
    else:
        sys.exit(f"unknown command {what}")


if __name__ == "__main__":
    main()
