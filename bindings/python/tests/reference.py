"""Plain numpy (float64) formulas the binding is checked against."""

import numpy as np


def rope(x, positions, theta, style="half_split", rotary_dim=0, position_scale=1.0):
    """RoPE on x [n, heads, head_dim], token i at positions[i]; returns float64.

    Like kvsieve (and most engines) the frequencies and the scaled positions are float32
    values, so large positions agree closely.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    r = rotary_dim or d
    half = r // 2
    inv_freq = (float(theta) ** (-2.0 * np.arange(half) / r)).astype(np.float32).astype(np.float64)
    scaled = (np.asarray(positions, dtype=np.float32) / np.float32(position_scale)).astype(np.float64)
    angle = scaled[:, None] * inv_freq[None, :]
    cos = np.cos(angle)[:, None, :]
    sin = np.sin(angle)[:, None, :]
    out = x.copy()
    if style == "half_split":
        ia, ib = np.arange(half), np.arange(half) + half
    else:
        ia, ib = 2 * np.arange(half), 2 * np.arange(half) + 1
    a, b = x[..., ia], x[..., ib]
    out[..., ia] = a * cos - b * sin
    out[..., ib] = a * sin + b * cos
    return out


def attention(q, k, v, *, scale=None, logit_soft_cap=None, causal=True):
    """Attention of q [nq, Hq, D] over k, v [n, Hk, D]; the queries are the last nq tokens.

    Returns (out [nq, Hq, D], lse [nq, Hq]) in float64. A query that sees no key gets a zero
    output and an LSE of -inf.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nq, hq, d = q.shape
    n, hk, _ = k.shape
    group = hq // hk
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((nq, hq, d))
    lse = np.full((nq, hq), -np.inf)
    for i in range(nq):
        visible = n - nq + i + 1 if causal else n
        if visible <= 0:
            continue
        for h in range(hq):
            kh = h // group
            s = k[:visible, kh] @ q[i, h] * scale
            if logit_soft_cap is not None:
                s = logit_soft_cap * np.tanh(s / logit_soft_cap)
            m = s.max()
            p = np.exp(s - m)
            out[i, h] = p @ v[:visible, kh] / p.sum()
            lse[i, h] = m + np.log(p.sum())
    return out, lse


def merge(v_a, lse_a, v_b, lse_b):
    """Merge two attention states by their LSEs (float64)."""
    v_a, v_b = np.asarray(v_a, np.float64), np.asarray(v_b, np.float64)
    lse_a, lse_b = np.asarray(lse_a, np.float64), np.asarray(lse_b, np.float64)
    m = np.maximum(lse_a, lse_b)
    wa = np.exp(lse_a - m)
    wb = np.exp(lse_b - m)
    lse = m + np.log(wa + wb)
    v = (v_a * wa[..., None] + v_b * wb[..., None]) / (wa + wb)[..., None]
    return v, lse


def selected_attention(
    q,
    q_tokens,
    k,
    v,
    heads,
    *,
    positions=None,
    rope_cfg=None,
    position_mode="original",
    max_distance=None,
    windows=None,
    scale=None,
):
    """Attention of queries q [nq, Hq, D], query i at token index q_tokens[i], over only the
    selected tokens of k, v [n, Hk, D] (the whole sequence, as stored). Returns (out, lse)
    in float64.

    heads[h] lists the tokens KV head h selected (ascending). Query token qt sees the
    selected tokens t <= qt; with windows[h] = (sinks, window) only those with t < sinks or
    qt - t < window.

    rope_cfg (a dict of `rope()`'s keyword arguments, theta required) means the keys (and the
    queries) are given before RoPE and rotated here, with positions numbered as
    position_mode says:
    - "original": keys at positions[t], the query at positions[qt];
    - "contiguous": a head's selected tokens numbered 0, 1, ... in order (whatever the window
      hides), the query at the count of selected tokens below qt;
    - "capped": the query at positions[qt], a key at positions[qt] - min(positions[qt] -
      positions[t], max_distance).
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nq, hq, d = q.shape
    n, hk, _ = k.shape
    group = hq // hk
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    out = np.zeros((nq, hq, d))
    lse = np.full((nq, hq), -np.inf)
    for i, qt in enumerate(q_tokens):
        for h in range(hq):
            kh = h // group
            kept = np.asarray(heads[kh], dtype=np.int64)
            vis = kept[kept <= qt]
            if windows is not None and windows[kh] is not None:
                sinks, window = windows[kh]
                vis = vis[(vis < sinks) | (qt - vis < window)]
            if len(vis) == 0:
                continue
            qh = q[i, h]
            kk = k[vis, kh]
            if rope_cfg is not None:
                if position_mode == "contiguous":
                    q_pos = np.sum(kept < qt)
                    k_pos = np.searchsorted(kept, vis)
                elif position_mode == "capped":
                    q_pos = positions[qt]
                    k_pos = q_pos - np.minimum(q_pos - positions[vis], max_distance)
                else:
                    q_pos = positions[qt]
                    k_pos = positions[vis]
                qh = rope(qh[None, None, :], [q_pos], **rope_cfg)[0, 0]
                kk = rope(kk[:, None, :], k_pos, **rope_cfg)[:, 0]
            s = kk @ qh * scale
            m = s.max()
            p = np.exp(s - m)
            out[i, h] = p @ v[vis, kh] / p.sum()
            lse[i, h] = m + np.log(p.sum())
    return out, lse

