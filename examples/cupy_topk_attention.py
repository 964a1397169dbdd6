"""Top-k attention on the GPU with CuPy arrays, checked against the NumPy result.

Run: python examples/cupy_topk_attention.py   (prints "skipped" and exits 0 without CuPy or a GPU)
"""
import sys

import numpy as np

import topkattn as ta
from topkattn.backend import require_cupy

try:
    cp = require_cupy()
except RuntimeError as e:
    print(f"skipped cupy example: {e}")
    sys.exit(0)

rng = np.random.default_rng(0)
B, H, G, T, D, K = 2, 8, 2, 256, 64, 16  # grouped-query attention: 8 query heads share 2 KV heads
q = rng.standard_normal((B, H, T, D)).astype(np.float32)
k = rng.standard_normal((B, G, T, D)).astype(np.float32)
v = rng.standard_normal((B, G, T, D)).astype(np.float32)

out_gpu, saved = ta.topk_attention_forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), topk=K)
assert isinstance(out_gpu, cp.ndarray)
dq, dk, dv = ta.topk_attention_backward(cp.ones_like(out_gpu), saved)

out_cpu, saved_cpu = ta.topk_attention_forward(q, k, v, topk=K)
dq_cpu, dk_cpu, dv_cpu = ta.topk_attention_backward(np.ones_like(out_cpu), saved_cpu)
err = float(np.max(np.abs(cp.asnumpy(out_gpu) - out_cpu)))
gerr = max(float(np.max(np.abs(cp.asnumpy(a) - b))) for a, b in ((dq, dq_cpu), (dk, dk_cpu), (dv, dv_cpu)))
assert err < 1e-4 and gerr < 1e-3, (err, gerr)
print(f"OK cupy: max abs diff to NumPy forward {err:.1e}, gradients {gerr:.1e}")
