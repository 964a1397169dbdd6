"""A DeepSeek-style decoder: embedding, optional token shift, L pre-norm blocks (MLA or plain
attention + SwiGLU or MoE), final RMSNorm, head (tied with the embedding by default).

Shape letters: B batch, T tokens, d model width, V vocabulary, L layers: tokens (B, T) int,
x (B, T, d), logits (B, T, V).
No autograd engine: ``backward`` runs the layers' backward passes in reverse order.
"""
import dataclasses

import numpy as np

from topkattn.backend import get_array_module
from topkattn.checks import ConfigDict, check_choice, check_int, check_real, float_dtype
from topkattn.layers.attention import Attention
from topkattn.layers.block import Block
from topkattn.layers.embedding import Embedding
from topkattn.layers.linear import Linear
from topkattn.layers.mla import MLA
from topkattn.layers.module import Module, check_grad_output
from topkattn.layers.moe import MoE
from topkattn.layers.rmsnorm import RMSNorm
from topkattn.layers.rope import check_rope_base
from topkattn.layers.swiglu import SwiGLU
from topkattn.layers.token_shift import TokenShift


@dataclasses.dataclass
class TransformerConfig(ConfigDict):
    """Model hyper-parameters (JSON-serialisable with :meth:`to_dict`)."""

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    attention: str = "mla"  # "mla" | "mha" (plain attention; n_kv_heads for GQA/MQA)
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_dim: int = 16
    qk_rope_dim: int = 8
    v_head_dim: int = 16  # value head dim, for "mla" and "mha" alike (may differ from the qk dim)
    n_kv_heads: int = None  # attention="mha": None = n_heads
    head_dim: int = None  # attention="mha": qk head dim, None = d_model // n_heads
    ffn: str = "swiglu"  # "swiglu" | "moe"
    d_ff: int = 128
    n_experts: int = 4
    moe_topk: int = 2
    aux_loss_weight: float = 0.01
    topk: int = None  # None = dense attention
    forget_rate: float = 0.0
    persistent_tokens: int = 0
    window: int = 0
    tie_embeddings: bool = True
    token_shift: bool = False  # x_t + W x_{t-1} after the embedding (topkattn.layers.token_shift)
    rope_base: float = 10000.0
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_dim", "qk_rope_dim", "v_head_dim", "d_ff", "n_experts", "moe_topk"):
            check_int(name, getattr(self, name), 1)
        for name in ("n_kv_heads", "head_dim", "topk"):  # None: derived (heads, dims) or dense (topk)
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("persistent_tokens", "window", "seed"):
            check_int(name, getattr(self, name), 0)
        check_choice("attention", self.attention, ("mla", "mha"))
        check_choice("ffn", self.ffn, ("swiglu", "moe"))
        check_real("forget_rate", self.forget_rate, 0.0, 1.0, hi_open=True)
        check_real("aux_loss_weight", self.aux_loss_weight, 0.0)
        check_rope_base("rope_base", self.rope_base)
        for name in ("tie_embeddings", "token_shift"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        float_dtype(self.dtype)
        self.dtype = np.dtype(self.dtype).name


class Transformer(Module):
    """The model.  ``params``/``grads``: flat dicts of dotted names ("embed.weight",
    "blocks.0.attn.W_DQ", ...) sharing the layers' arrays (update them in place).

    ``backward`` **overwrites** ``grads`` (zeros them, then accumulates every layer and,
    with MoE, ``aux_loss_weight`` times the auxiliary loss gradient).
    """

    def __init__(self, cfg):
        if isinstance(cfg, dict):
            cfg = TransformerConfig.from_dict(cfg)
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"cfg must be a TransformerConfig or dict, got {type(cfg).__name__}")
        super().__init__()
        self.cfg = c = cfg
        seeds = np.random.SeedSequence(c.seed).spawn(c.n_layers + 2)
        def rng(i):
            return np.random.default_rng(seeds[i])
        self.embed = self.add("embed", Embedding(c.vocab_size, c.d_model, seed=rng(0), dtype=c.dtype))
        self.blocks = []
        for i in range(c.n_layers):
            r = rng(i + 1)
            if c.attention == "mla":
                attn = MLA(c.d_model, c.n_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_dim,
                           c.qk_rope_dim, c.v_head_dim, topk=c.topk, seed=r, dtype=c.dtype,
                           persistent_tokens=c.persistent_tokens, window=c.window,
                           forget_rate=c.forget_rate, rope_base=c.rope_base)
            else:
                attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim, topk=c.topk,
                                 seed=r, dtype=c.dtype, persistent_tokens=c.persistent_tokens,
                                 window=c.window, forget_rate=c.forget_rate, rope_base=c.rope_base)
            if c.ffn == "moe":
                ffn = MoE(c.d_model, c.d_ff, c.n_experts, c.moe_topk, c.aux_loss_weight, seed=r, dtype=c.dtype)
            else:
                ffn = SwiGLU(c.d_model, c.d_ff, seed=r, dtype=c.dtype)
            self.blocks.append(self.add(f"blocks.{i}", Block(attn, ffn, c.d_model, dtype=c.dtype)))
        self.norm = self.add("norm", RMSNorm(c.d_model, dtype=c.dtype))
        self.head = None
        if not c.tie_embeddings:
            self.head = self.add("head", Linear(c.d_model, c.vocab_size, seed=rng(c.n_layers + 1),
                                                dtype=c.dtype))
        self.shift = None
        if c.token_shift:
            self.shift = self.add("shift", TokenShift(c.d_model, dtype=c.dtype))
        self.aux_loss = 0.0
        self.training = True
        self._logits = None  # (shape, empty array of the dtype and device) of the last forward's logits
        self._rebuild()

    def _rebuild(self):
        self.params = {}
        self.grads = {}
        self._flat_params = dict(self.named_params())
        self._flat_grads = dict(self.named_grads())

    # Module keeps own params in self.params; the model has none of its own, so expose the flat view
    def named_params(self, prefix=""):
        for cn, ch in self._children.items():
            yield from ch.named_params(f"{prefix}{cn}.")

    def named_grads(self, prefix=""):
        for cn, ch in self._children.items():
            yield from ch.named_grads(f"{prefix}{cn}.")

    @property
    def params(self):
        return self._flat_params

    @params.setter
    def params(self, value):
        self._flat_params = value

    @property
    def grads(self):
        return self._flat_grads

    @grads.setter
    def grads(self, value):
        self._flat_grads = value

    def train(self, mode=True):
        """Training mode applies forgetful masking (cfg.forget_rate); eval mode does not."""
        self.training = bool(mode)
        for b in self.blocks:
            b.attn.training = self.training
        return self

    def eval(self):
        return self.train(False)

    def layer_seeds(self, seed):
        """Per-layer forgetting seeds derived from ``seed`` (None stays None)."""
        if seed is None:
            return [None] * len(self.blocks)
        if isinstance(seed, np.random.Generator):
            seed = int(seed.integers(2**63))
        ss = np.random.SeedSequence(int(seed)).spawn(len(self.blocks))
        return [int(s.generate_state(1, np.uint64)[0]) for s in ss]

    def forward(self, tokens, seed=None):
        """logits (B, T, V) from tokens (B, T); ``seed`` drives forgetful masking."""
        x = self.embed.forward(tokens)  # (B, T, d)
        if self.shift is not None:
            x = self.shift.forward(x)
        for blk, s in zip(self.blocks, self.layer_seeds(seed)):
            x = blk.forward(x, seed=s)
        h = self.norm.forward(x)
        self.aux_loss = float(self.cfg.aux_loss_weight * sum(b.aux_loss for b in self.blocks))
        logits = self.head.forward(h) if self.head is not None else self.embed.logits(h)
        self._logits = (logits.shape, get_array_module(logits).empty(0, logits.dtype))
        return logits

    def backward(self, dlogits):
        """Fill ``grads`` from dlogits (B, T, V); returns None (tokens have no gradient)."""
        if self._logits is None:
            raise RuntimeError("Transformer.backward called before forward")
        dlogits = check_grad_output(dlogits, *self._logits, name="dlogits")  # (B, T, V); before zero_grad
        self.zero_grad()
        dh = self.head.backward(dlogits) if self.head is not None else self.embed.backward_logits(dlogits)
        dx = self.norm.backward(dh)
        for blk in reversed(self.blocks):
            dx = blk.backward(dx)
        if self.shift is not None:
            dx = self.shift.backward(dx)
        self.embed.backward(dx)
        return None

    def init_cache(self, batch):
        """A :class:`ModelCache`: one decode cache per block (MLA: latent cache; mha: full KV cache)."""
        return ModelCache(b.init_cache(batch) for b in self.blocks)

    def step(self, tokens_t, cache):
        """logits (B, 1, V) for tokens_t (B, 1); appends to every block's cache."""
        if not isinstance(cache, ModelCache) or len(cache) != len(self.blocks):
            raise TypeError("cache must come from this model's init_cache")
        tokens_t = self.embed.check_tokens(tokens_t)
        if tokens_t.shape[1] != 1:
            raise ValueError(f"tokens_t must have shape (B, 1), got {tuple(tokens_t.shape)}")
        x = self.embed.step(tokens_t)  # (B, 1, d)
        if self.shift is not None:
            x, cache.prev = self.shift.step(x, cache.prev), x
        for blk, c in zip(self.blocks, cache):
            x = blk.step(x, c)
        h = self.norm.step(x)
        return self.head.step(h) if self.head is not None else self.embed.logits_step(h)

    def to_device(self, xp):
        """Move every param and grad to ``xp`` (numpy or cupy); returns self."""
        for ch in self._children.values():
            ch.to_device(xp)
        self._rebuild()
        return self

    def n_params(self):
        return int(sum(p.size for p in self.params.values()))


class ModelCache(list):
    """The decode state of a :class:`Transformer`: one cache per block (the list items) and
    ``prev``, the previous token's embedding (B, 1, d) that the token shift reads."""

    def __init__(self, caches=()):
        super().__init__(caches)
        self.prev = None
