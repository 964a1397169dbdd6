"""The `train-toy` model written in plain PyTorch eager, as a user would: the peer of
``bench_train_toy.py --peer torch`` (torch is a benchmark and test dependency only).

Same architecture as :class:`topkattn.model.Transformer` built by
:func:`topkattn.training.train.model_config`: tied embeddings, a token shift
(x_t + W x_{t-1}), L pre-norm blocks of MLA (DeepSeek-style, decoupled RoPE) and SwiGLU,
RMSNorm, the final norm.  Attention is dense ``F.scaled_dot_product_attention`` (causal)
or top-k in the seed style: full (T, S) scores, ``topk``, a mask scattered from the
indices, softmax, weighted values.  Parameters carry topkattn's dotted names, so
:func:`from_topkattn` copies a topkattn model's weights and :func:`grads_by_name` reads
the gradients back under the same names.

Shape letters: B batch, T tokens, d model width, H heads, V vocabulary, Dn / R / Dv the
per-head nope / rope / value dims, S = T keys.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def rms_norm(x, g, eps):
    """x (..., n) * rsqrt(mean(x^2) + eps) * g, the formula of topkattn.layers.rmsnorm."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * g


def rope_tables(T, R, base, dtype):
    """(cos, sin), each (T, R/2): position t, pair i rotated by t * base^(-2i/R)."""
    half = R // 2
    inv = base ** (-np.arange(half, dtype=np.float64) / half)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return (torch.tensor(np.cos(ang), dtype=dtype), torch.tensor(np.sin(ang), dtype=dtype))


def rope(x, cos, sin):
    """Rotate-half RoPE on the last axis of x (..., T, R)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def topk_attention(q, k, v, topk, scale):
    """Causal top-k attention, seed style: q, k (B, H, T, Dq), v (B, H, T, Dv) -> (B, H, T, Dv).

    Full scores, the causal mask, ``topk`` per row, a -inf mask with zeros scattered at the
    chosen keys, softmax, weighted values.  A row seeing fewer than ``topk`` keys picks some
    hidden (-inf) ones too; they keep weight 0.
    """
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(causal, float("-inf"))
    kk = min(topk, T)
    idx = s.topk(kk, dim=-1).indices  # (B, H, T, K)
    mask = torch.full_like(s, float("-inf")).scatter(-1, idx, 0.0)
    p = torch.softmax(s + mask, dim=-1)
    return p @ v


class TorchToyModel(torch.nn.Module):
    """The train-toy model from a :class:`topkattn.model.TransformerConfig` ``mc``.

    Parameters are registered in ``self.p`` (a ParameterDict) under topkattn's dotted names
    with '.' written '/' (ParameterDict keys may not hold dots).
    """

    def __init__(self, mc, params, dtype=torch.float32):
        super().__init__()
        if mc.attention != "mla" or mc.ffn != "swiglu" or not mc.tie_embeddings:
            raise ValueError("the torch peer models MLA + SwiGLU with tied embeddings only")
        if mc.persistent_tokens or mc.window or mc.forget_rate:
            raise ValueError("the torch peer has no persistent tokens, window or forgetful masking")
        self.mc = mc
        self.p = torch.nn.ParameterDict(
            {n.replace(".", "/"): torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=dtype))
             for n, a in params.items()})
        self.scale = 1.0 / math.sqrt(mc.qk_nope_dim + mc.qk_rope_dim)
        self.dtype = dtype
        self._rope = {}

    def w(self, name):
        return self.p[name.replace(".", "/")]

    def _tables(self, T):
        if T not in self._rope:
            self._rope[T] = rope_tables(T, self.mc.qk_rope_dim, self.mc.rope_base, self.dtype)
        return self._rope[T]

    def mla(self, i, x):
        mc, w = self.mc, (lambda n: self.w(f"blocks.{i}.attn.{n}"))
        B, T, _ = x.shape
        H, Dn, R, Dv = mc.n_heads, mc.qk_nope_dim, mc.qk_rope_dim, mc.v_head_dim
        cos, sin = self._tables(T)
        cq = rms_norm(F.linear(x, w("W_DQ")), w("q_norm"), 1e-6)  # (B, T, Lq)
        qn = F.linear(cq, w("W_UQ")).view(B, T, H, Dn).transpose(1, 2)  # (B, H, T, Dn)
        qr = rope(F.linear(cq, w("W_QR")).view(B, T, H, R).transpose(1, 2), cos, sin)
        c = rms_norm(F.linear(x, w("W_DKV")), w("kv_norm"), 1e-6)  # (B, T, C)
        kr = rope(F.linear(x, w("W_KR")), cos, sin)  # (B, T, R)
        kn = F.linear(c, w("W_UK")).view(B, T, H, Dn).transpose(1, 2)
        v = F.linear(c, w("W_UV")).view(B, T, H, Dv).transpose(1, 2)  # (B, H, T, Dv)
        q = torch.cat([qn, qr], dim=-1)
        k = torch.cat([kn, kr[:, None].expand(B, H, T, R)], dim=-1)
        if mc.topk is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = topk_attention(q, k, v, mc.topk, self.scale)
        return F.linear(o.transpose(1, 2).reshape(B, T, H * Dv), w("W_O"))

    def swiglu(self, i, x):
        w = lambda n: self.w(f"blocks.{i}.ffn.{n}")  # noqa: E731
        return F.linear(F.silu(F.linear(x, w("W1"))) * F.linear(x, w("W3")), w("W2"))

    def forward(self, tokens):
        """logits (B, T, V) from tokens (B, T) int64."""
        E = self.w("embed.weight")
        x = F.embedding(tokens, E)  # (B, T, d)
        if self.mc.token_shift:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}, zero at t = 0
            x = x + F.linear(prev, self.w("shift.weight"))
        for i in range(self.mc.n_layers):
            x = x + self.mla(i, rms_norm(x, self.w(f"blocks.{i}.attn_norm.weight"), 1e-6))
            x = x + self.swiglu(i, rms_norm(x, self.w(f"blocks.{i}.ffn_norm.weight"), 1e-6))
        return F.linear(rms_norm(x, self.w("norm.weight"), 1e-6), E)

    def loss(self, tokens, targets):
        logits = self.forward(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def from_topkattn(model, dtype=torch.float32):
    """A :class:`TorchToyModel` holding a copy of topkattn ``model``'s weights."""
    return TorchToyModel(model.cfg, {n: np.asarray(a) for n, a in model.params.items()}, dtype=dtype)


def grads_by_name(tmodel):
    """topkattn-named gradients of a torch peer as float64 NumPy arrays."""
    return {n.replace("/", "."): p.grad.detach().double().numpy() for n, p in tmodel.p.items()}


def params_by_name(tmodel):
    return {n.replace("/", "."): p.detach().double().numpy() for n, p in tmodel.p.items()}


def make_adamw(tmodel, cfg):
    """torch.optim.AdamW with train-toy's hyper-parameters; decay on matrices only (as topkattn)."""
    decay = [p for p in tmodel.p.values() if p.ndim >= 2]
    rest = [p for p in tmodel.p.values() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


def train_step(tmodel, opt, x, y, lr, clip_norm):
    """One train-toy step in torch: forward, loss, backward, global-norm clip, AdamW at ``lr``.
    Returns the loss (a float)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = tmodel.loss(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tmodel.parameters(), clip_norm)
    opt.step()
    return loss.item()
