"""Top-k attention inside plain NumPy code: forward, backward, and a check against an explicit mask.

Run: python examples/numpy_topk_attention.py
"""
import numpy as np

import topkattn as ta

rng = np.random.default_rng(0)
B, H, T, D, K = 2, 4, 64, 16, 8  # batch, heads, tokens, head dim, keys kept per query
x = rng.standard_normal((B, T, H * D))
Wq, Wk, Wv = (rng.standard_normal((H * D, H * D)) / np.sqrt(H * D) for _ in range(3))


def heads(a):  # (B, T, H*D) -> (B, H, T, D)
    return a.reshape(B, T, H, D).transpose(0, 2, 1, 3)


q, k, v = heads(x @ Wq), heads(x @ Wk), heads(x @ Wv)
out, saved = ta.topk_attention_forward(q, k, v, topk=K, causal=True)  # (B, H, T, D)

# The same thing written out: causal scores, keep each row's K largest, softmax over them.
s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)  # (B, H, T, T)
s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
kth = -np.sort(-s, axis=-1)[..., K - 1 : K]  # K-th largest per row (-inf when fewer than K visible)
s = np.where(s >= kth, s, -np.inf)
p = np.exp(s - s.max(-1, keepdims=True))
want = (p / p.sum(-1, keepdims=True)) @ v
err = np.max(np.abs(out - want))
assert err < 1e-12, err

# Backward: gradient of sum(out * w) with respect to q, checked along a random direction.
w = rng.standard_normal(out.shape)
dq, dk, dv = ta.topk_attention_backward(w, saved)
u, h = rng.standard_normal(q.shape), 1e-6
num = ((ta.topk_attention(q + h * u, k, v, topk=K) * w).sum()
       - (ta.topk_attention(q - h * u, k, v, topk=K) * w).sum()) / (2 * h)
assert abs(num - (dq * u).sum()) < 1e-6 * max(1.0, abs(num)), (num, (dq * u).sum())
print(f"OK numpy: forward max abs diff {err:.1e}, directional grad {num:.6f} vs {(dq * u).sum():.6f}")
