"""A DeepSeek-style decoder: embedding, optional token shift, L pre-norm blocks (MLA or plain
attention + SwiGLU or MoE), final RMSNorm, head (tied with the embedding by default).

Shape letters: B batch, T tokens, d model width, V vocabulary, L layers: tokens (B, T) int,
x (B, T, d), logits (B, T, V).
No autograd engine: ``backward`` runs the layers' backward passes in reverse order.

Decoding: :meth:`Transformer.decoding` installs one decode selector per layer (the protocol of
:mod:`topkattn.decoding.selectors`), :meth:`Transformer.step` feeds one token through the
caches, :meth:`Transformer.generate` samples.  Weights export to safetensors with the config
in the file's metadata (:meth:`Transformer.to_safetensors`, :meth:`Transformer.from_safetensors`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from topkattn.backend import Array, get_array_module, to_numpy
from topkattn.checks import ConfigDict, check_choice, check_int, check_real, float_dtype, make_rng
from topkattn.layers.attend import check_selection, check_tail
from topkattn.layers.attention import Attention
from topkattn.layers.attention_stats import AttentionStats
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
from topkattn.storage import MissingFileError, StorageError, atomic_write

SAFETENSORS_CONFIG_KEY = "topkattn.config"  # the TransformerConfig as JSON, in the safetensors metadata
SAFETENSORS_VERSION_KEY = "topkattn.version"
SAFETENSORS_TEMP_PREFIX = ".safetensors-"  # temporary files of an interrupted export


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
    n_kv_heads: int | None = None  # attention="mha": None = n_heads
    head_dim: int | None = None  # attention="mha": qk head dim, None = d_model // n_heads
    ffn: str = "swiglu"  # "swiglu" | "moe"
    d_ff: int = 128
    n_experts: int = 4
    moe_topk: int = 2
    aux_loss_weight: float = 0.01
    topk: int | None = None  # None = dense attention
    forget_rate: float = 0.0
    persistent_tokens: int = 0
    window: int = 0
    tie_embeddings: bool = True
    token_shift: bool = False  # x_t + W x_{t-1} after the embedding (topkattn.layers.token_shift)
    rope_base: float = 10000.0
    dtype: str = "float32"
    seed: int = 0
    kv_experts: int = 0  # E expert KV up-projections ("mla") or K/V projections ("mha"); 0: none
    kv_experts_active: int | None = None  # experts per query token, None: min(2, kv_experts)
    k_rank: int | None = None  # "mla": key latent rank (DiffQKV); None: kv_lora_rank
    v_rank: int | None = None  # "mla": value latent rank; either rank set: separate latents
    q_head_dim: int | None = None  # query/key head dim ("mla": qk_nope_dim + qk_rope_dim; "mha": head_dim)
    ternary: bool = False  # every attention projection ternary (BitNet b1.58), packed at decode
    act_bits: int | None = None  # ternary: per-token absmax activation bits (None: float)
    selection: str = "token"  # "token" (topk over keys, dense with topk=None) | "block" (block top-k, MoBA)
    block_size: int | None = None  # selection="block": keys per block
    topk_blocks: int | None = None  # selection="block": blocks each query attends (its own included)
    dense_layers: tuple[int, ...] = ()  # layer indices with dense attention (hybrid: the others sparse)
    tail: str | None = None  # None | "mean": token top-k's dropped softmax mass to the mean unselected value

    def __post_init__(self) -> None:
        self._plain_scalars()
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_dim", "qk_rope_dim", "v_head_dim", "d_ff", "n_experts", "moe_topk"):
            check_int(name, getattr(self, name), 1)
        for name in ("n_kv_heads", "head_dim", "topk", "kv_experts_active", "k_rank", "v_rank", "q_head_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("persistent_tokens", "window", "seed", "kv_experts"):
            check_int(name, getattr(self, name), 0)
        check_choice("attention", self.attention, ("mla", "mha"))
        check_choice("ffn", self.ffn, ("swiglu", "moe"))
        check_real("forget_rate", self.forget_rate, 0.0, 1.0, hi_open=True)
        check_real("aux_loss_weight", self.aux_loss_weight, 0.0)
        check_rope_base("rope_base", self.rope_base)
        for name in ("tie_embeddings", "token_shift", "ternary"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        float_dtype(self.dtype)
        self.dtype = np.dtype(self.dtype).name
        self._check_variants()
        self._check_selection()

    def _check_selection(self) -> None:
        """selection/block_size/topk_blocks (as the layers check them) and dense_layers: distinct
        layer indices in [0, n_layers), kept as a sorted tuple (a JSON list loads too)."""
        check_selection(self.selection, self.block_size, self.topk_blocks, topk=self.topk, window=self.window,
                        forget_rate=self.forget_rate)
        check_tail(self.tail, selection=self.selection, topk=self.topk, forget_rate=self.forget_rate)
        if isinstance(self.dense_layers, (str, bytes)) or not isinstance(self.dense_layers, Iterable):
            raise TypeError(f"dense_layers must be a sequence of layer indices, got {self.dense_layers!r}")
        layers = [check_int("dense_layers[]", i, 0, self.n_layers - 1) for i in self.dense_layers]
        if len(set(layers)) != len(layers):
            raise ValueError(f"dense_layers must not repeat a layer, got {list(self.dense_layers)}")
        self.dense_layers = tuple(sorted(layers))

    def layer_attention(self, i: int) -> dict[str, Any]:
        """The attention selection keywords of layer ``i``: dense in ``dense_layers``, else the config's."""
        if i in self.dense_layers:
            return {"topk": None, "selection": "token", "block_size": None, "topk_blocks": None, "tail": None}
        return {"topk": self.topk, "selection": self.selection, "block_size": self.block_size,
                "topk_blocks": self.topk_blocks, "tail": self.tail}

    def _check_variants(self) -> None:
        """The attention variants' cross-field rules (ValueError naming the fields)."""
        E, r = self.kv_experts, self.kv_experts_active
        if r is not None and not E:
            raise ValueError(f"kv_experts_active needs kv_experts >= 1, got kv_experts_active={r} with kv_experts=0")
        if r is not None and r > E:
            raise ValueError(f"kv_experts_active must be <= kv_experts={E}, got {r}")
        if self.attention == "mha" and (self.k_rank is not None or self.v_rank is not None):
            raise ValueError(f"k_rank and v_rank are MLA's separate key/value latent ranks and need attention='mla', "
                             f"got k_rank={self.k_rank!r}, v_rank={self.v_rank!r} with attention='mha' (plain "
                             f"attention's widths are head_dim/q_head_dim and v_head_dim)")
        if self.q_head_dim is not None and self.attention == "mla" and self.q_head_dim <= self.qk_rope_dim:
            raise ValueError(f"q_head_dim must exceed qk_rope_dim={self.qk_rope_dim} (the nope part is "
                             f"q_head_dim - qk_rope_dim), got {self.q_head_dim}")
        if self.act_bits is not None:
            if not self.ternary:
                raise ValueError(f"act_bits applies only with ternary=True, got act_bits={self.act_bits!r}")
            check_int("act_bits", self.act_bits, 2, 8)


class Transformer(Module):
    """The model.  ``params``/``grads``: flat dicts of dotted names ("embed.weight",
    "blocks.0.attn.W_DQ", ...) sharing the layers' arrays (update them in place).

    ``backward`` **overwrites** ``grads`` (zeros them, then accumulates every layer and,
    with MoE, ``aux_loss_weight`` times the auxiliary loss gradient).
    """

    def __init__(self, cfg: TransformerConfig | Mapping[str, Any]) -> None:
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
                nope = c.qk_nope_dim if c.q_head_dim is None else c.q_head_dim - c.qk_rope_dim
                attn = MLA(c.d_model, c.n_heads, c.q_lora_rank, c.kv_lora_rank, nope,
                           c.qk_rope_dim, c.v_head_dim, **c.layer_attention(i), seed=r, dtype=c.dtype,
                           persistent_tokens=c.persistent_tokens, window=c.window,
                           forget_rate=c.forget_rate, rope_base=c.rope_base, kv_experts=c.kv_experts,
                           kv_experts_active=c.kv_experts_active, aux_loss_weight=c.aux_loss_weight,
                           k_rank=c.k_rank, v_rank=c.v_rank, ternary=c.ternary, act_bits=c.act_bits)
            else:
                head_dim = c.head_dim if c.q_head_dim is None else c.q_head_dim
                attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, head_dim, c.v_head_dim,
                                 **c.layer_attention(i), seed=r, dtype=c.dtype, persistent_tokens=c.persistent_tokens,
                                 window=c.window, forget_rate=c.forget_rate, rope_base=c.rope_base,
                                 kv_experts=c.kv_experts, kv_experts_active=c.kv_experts_active,
                                 aux_loss_weight=c.aux_loss_weight, ternary=c.ternary, act_bits=c.act_bits)
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
    def named_params(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for cn, ch in self._children.items():
            yield from ch.named_params(f"{prefix}{cn}.")

    def named_grads(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for cn, ch in self._children.items():
            yield from ch.named_grads(f"{prefix}{cn}.")

    @property
    def params(self) -> dict[str, Array]:
        return self._flat_params

    @params.setter
    def params(self, value: dict[str, Array]) -> None:
        self._flat_params = value

    @property
    def grads(self) -> dict[str, Array]:
        return self._flat_grads

    @grads.setter
    def grads(self, value: dict[str, Array]) -> None:
        self._flat_grads = value

    def train(self, mode: bool = True) -> Transformer:
        """Training mode applies forgetful masking (cfg.forget_rate); eval mode does not."""
        self.training = bool(mode)
        for b in self.blocks:
            b.attn.training = self.training
        return self

    def eval(self) -> Transformer:
        return self.train(False)

    def layer_seeds(self, seed: int | np.random.Generator | None) -> list[int | None]:
        """Per-layer forgetting seeds derived from ``seed`` (None stays None)."""
        if seed is None:
            return [None] * len(self.blocks)
        if isinstance(seed, np.random.Generator):
            seed = int(seed.integers(2**63))
        ss = np.random.SeedSequence(int(seed)).spawn(len(self.blocks))
        return [int(s.generate_state(1, np.uint64)[0]) for s in ss]

    def forward(self, tokens: Array, seed: int | np.random.Generator | None = None) -> Array:
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

    def backward(self, dlogits: Array) -> None:
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

    def init_cache(self, batch: int) -> ModelCache:
        """A :class:`ModelCache`: one decode cache per block (MLA: latent cache; mha: full KV cache)."""
        return ModelCache(b.init_cache(batch) for b in self.blocks)

    def step(self, tokens_t: Array, cache: ModelCache) -> Array:
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

    def to_device(self, xp: ModuleType) -> Transformer:
        """Move every param and grad to ``xp`` (numpy or cupy); returns self."""
        for ch in self._children.values():
            ch.to_device(xp)
        self._rebuild()
        return self

    def n_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def enable_attention_stats(self, enabled: bool = True) -> Transformer:
        """Give every attention layer a fresh :class:`AttentionStats` (``enabled=False``: none, the
        default: no counting); from then on each forward and decode step is recorded.  Returns self."""
        for b in self.blocks:
            b.attn.stats = AttentionStats() if enabled else None
        return self

    def attention_stats(self) -> dict[str, Any]:
        """What the layers' key selection did since :meth:`enable_attention_stats` (JSON-able).

        ``{"layers": [per layer: {"selection": "dense" | "topk" | "auto" | "block", **stats.as_dict()}
        or None without stats], "all": the layers' stats merged (None if no layer has any)}``; each
        ``as_dict`` holds ``updates``, ``last`` and ``total`` (see :mod:`topkattn.layers.attention_stats`).
        """
        layers, kept = [], []
        for b in self.blocks:
            a = b.attn
            if a.stats is None:
                layers.append(None)
                continue
            kind = "block" if a.selection == "block" else ("dense" if a.topk is None else
                                                           ("auto" if a.topk == "auto" else "topk"))
            layers.append({"selection": kind, **a.stats.as_dict()})
            kept.append(a.stats)
        return {"layers": layers, "all": AttentionStats.merged(kept).as_dict() if kept else None}

    def kv_bytes_per_token(self) -> int:
        """Bytes every layer's decode cache adds per token, summed over the layers."""
        return int(sum(b.attn.kv_bytes_per_token for b in self.blocks))

    # -- decoding and generation -------------------------------------------------------------
    @contextlib.contextmanager
    def decoding(self, selectors: Sequence[Any] | None = None, *, topk: int | None = None) -> Iterator[list]:
        """Eval mode with one decode selector per layer, restored on exit (selectors, k, mode).

        ``selectors``: one per layer, each put in prefill (``begin_prefill``: exact selection,
        queries recorded) until the caller calls its ``end_prefill``; None keeps the layers' own
        (None: exact).  ``topk``: decode with this k (default: each layer's own; a dense-trained
        model needs one to use a selector).  Yields the list of selectors ([] for None).
        """
        layers = [blk.attn for blk in self.blocks]
        sels = [] if selectors is None else list(selectors)
        if selectors is not None and len(sels) != len(layers):
            raise ValueError(f"selectors must hold one selector per layer ({len(layers)}), got {len(sels)}")
        topk = check_int("topk", topk, 1, optional=True)
        saved = [(layer.selector, layer.topk) for layer in layers]
        was_training = self.training
        self.eval()
        try:
            for i, layer in enumerate(layers):
                if selectors is not None:
                    layer.selector = sels[i]
                if topk is not None:
                    layer.topk = topk
            for sel in sels:
                sel.begin_prefill()
            yield sels
        finally:
            for layer, (sel, k) in zip(layers, saved):
                layer.selector, layer.topk = sel, k
            self.train(was_training)

    def generate(self, prompt_ids: Any, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Any = None, selectors: Sequence[Any] | None = None, topk: int | None = None,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """``prompt_ids`` followed by ``max_new_tokens`` tokens sampled one at a time, int64 (T + N,)
        for a 1-D prompt (T,), (B, T + N) for a batch (B, T).

        The latent-cache decode path (:meth:`step`): the prompt is prefilled token by token
        with exact selection (the selectors record its queries), then each layer's selector
        picks the keys of every generated token.  ``temperature`` 0 is greedy (arg-max, the
        first on ties); above 0 the logits are divided by it and sampled from the smallest
        set of tokens whose probability reaches ``top_p`` (nucleus sampling), drawing from
        ``seed`` (an int, a Generator; None: fresh entropy).  ``selectors``/``topk``: see
        :meth:`decoding`.  ``progress(n)``: called after the n-th new token.  Eval mode (no
        forgetful masking) throughout; the mode is restored.
        """
        prompt = np.asarray(to_numpy(prompt_ids))
        if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
            raise ValueError(f"prompt_ids must be a non-empty int array (T,) or (B, T), got {prompt.dtype} "
                             f"shape {prompt.shape}")
        n_new = check_int("max_new_tokens", max_new_tokens, 0)
        temperature = check_real("temperature", temperature, 0.0)
        top_p = check_real("top_p", top_p, 0.0, 1.0, lo_open=True)
        rng = make_rng(seed, "seed", allow_none=True)
        tokens = prompt.reshape(-1, prompt.shape[-1]).astype(np.int64)  # (B, T)
        B, T = tokens.shape
        out = np.empty((B, T + n_new), dtype=np.int64)
        out[:, :T] = tokens
        xp = self.xp
        with self.decoding(selectors, topk=topk) as sels:
            cache = self.init_cache(B)
            for t in range(T):
                logits = self.step(xp.asarray(tokens[:, t:t + 1]), cache)  # (B, 1, V)
            for sel in sels:
                sel.end_prefill()
            for i in range(n_new):
                out[:, T + i] = sample_next_tokens(to_numpy(logits[:, -1]), temperature=temperature, top_p=top_p,
                                                   rng=rng)
                if i + 1 < n_new:
                    logits = self.step(xp.asarray(out[:, T + i:T + i + 1]), cache)
                if progress is not None:
                    progress(i + 1)
        return out[0] if prompt.ndim == 1 else out

    # -- safetensors ---------------------------------------------------------------------
    def to_safetensors(self, path: str | os.PathLike, *, dtype: str | np.dtype | None = None,
                       metadata: Mapping[str, str] | None = None) -> None:
        """Write the weights to ``path`` as safetensors (pickle-free; PyTorch, JAX and NumPy read
        it), atomically (temporary file, fsync, rename), replacing an existing file.

        Tensor names are ``params``' dotted names; the metadata holds the
        :class:`TransformerConfig` as JSON under ``"topkattn.config"`` (so
        :meth:`from_safetensors` rebuilds the model), the topkattn version, and ``metadata``
        (str -> str).  ``dtype``: "float16", "float32" or "float64" (default: the model's).
        Needs the ``safetensors`` package (``pip install 'topkattn[export]'``).
        """
        save = _safetensors().numpy.save
        dt = np.dtype(self.cfg.dtype if dtype is None else dtype)
        if dt not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype must be 'float16', 'float32' or 'float64', got {dtype!r}")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        if SAFETENSORS_CONFIG_KEY in meta or SAFETENSORS_VERSION_KEY in meta:
            raise ValueError(f"metadata must not set the reserved keys {SAFETENSORS_CONFIG_KEY!r}, "
                             f"{SAFETENSORS_VERSION_KEY!r}")
        meta[SAFETENSORS_CONFIG_KEY] = json.dumps(self.cfg.to_dict(), sort_keys=True)
        meta[SAFETENSORS_VERSION_KEY] = sys.modules["topkattn"].__version__  # the package root, loaded before us
        tensors = {name: np.ascontiguousarray(to_numpy(p).astype(dt, copy=False)) for name, p in self.params.items()}
        blob = save(tensors, metadata=meta)
        atomic_write(os.fspath(path), lambda f: f.write(blob), prefix=SAFETENSORS_TEMP_PREFIX)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike) -> Transformer:
        """The model :meth:`to_safetensors` wrote to ``path``, on the CPU, in its config's dtype
        (float16 weights are widened).  Raises :class:`topkattn.storage.MissingFileError` for a
        missing file and :class:`topkattn.storage.StorageError` (a ValueError) for a file that
        is not a readable safetensors file, lacks the config or does not fit it.  Nothing is
        unpickled.
        """
        st = _safetensors()
        path = os.fspath(path)
        if not os.path.exists(path):
            raise MissingFileError(f"model {path} does not exist")
        if os.path.isdir(path):
            raise StorageError(f"model {path} is a folder, not a safetensors file")
        try:
            with st.safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except OSError:
            raise
        except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
            raise StorageError(f"model {path} is not a readable safetensors file ({e})") from e
        if SAFETENSORS_CONFIG_KEY not in meta:
            raise StorageError(f"model {path} has no {SAFETENSORS_CONFIG_KEY!r} metadata: not a topkattn model "
                               f"export (Transformer.to_safetensors)")
        try:
            cfg = TransformerConfig.from_dict(json.loads(meta[SAFETENSORS_CONFIG_KEY]))
        except (ValueError, TypeError) as e:
            raise StorageError(f"model {path} has an unusable {SAFETENSORS_CONFIG_KEY!r}: {e}") from e
        model = cls(cfg)
        have, got = set(model.params), set(tensors)
        if have != got:
            raise StorageError(f"model {path} does not fit its config: tensors missing {sorted(have - got)}, "
                               f"unexpected {sorted(got - have)}")
        for name, p in model.params.items():
            a = tensors[name]
            if a.shape != p.shape or a.dtype.kind != "f":
                raise StorageError(f"model {path}: tensor {name!r} is {a.dtype} {a.shape}, the config needs "
                                   f"floats of shape {p.shape}")
            p[...] = a  # in place: params shares the layers' arrays
        return model


def sample_next_tokens(logits: np.ndarray, *, temperature: float, top_p: float = 1.0,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """One token per row of ``logits`` (B, V): int64 (B,).

    ``temperature`` 0: the arg-max (the first on ties).  Above 0: softmax(logits /
    temperature) in float64 (row maximum subtracted), restricted to the smallest set of the
    most probable tokens whose mass reaches ``top_p`` (the most probable always kept),
    renormalised, and sampled by inverse CDF with one ``rng.random()`` per row.
    FloatingPointError for NaN or infinite logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits must be (B, V) with V >= 1, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise FloatingPointError("the model produced NaN or infinite logits; cannot pick a token")
    if temperature == 0:
        return z.argmax(axis=-1).astype(np.int64)
    p = np.exp((z - z.max(axis=-1, keepdims=True)) / temperature)       # max first: no overflow for tiny T
    p /= p.sum(axis=-1, keepdims=True)                                   # (B, V)
    order = np.argsort(-p, axis=-1, kind="stable")                       # most probable first
    ranked = np.take_along_axis(p, order, axis=-1)
    keep_ranked = np.cumsum(ranked, axis=-1) - ranked < top_p            # mass before the token < top_p
    keep = np.zeros_like(keep_ranked)
    np.put_along_axis(keep, order, keep_ranked, axis=-1)
    p = np.where(keep, p, 0.0)
    c = np.cumsum(p, axis=-1)                                            # (B, V)
    u = 1.0 - make_rng(rng, "rng", allow_none=True).random(len(p))       # in (0, 1]: no zero-mass token
    return (c < (u * c[:, -1])[:, None]).sum(axis=-1).astype(np.int64)


def _safetensors():
    """The ``safetensors`` package, or ImportError naming the extra that installs it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:
        raise ImportError("safetensors export needs the safetensors package: pip install 'topkattn[export]'") from e
    return safetensors


class ModelCache(list):
    """The decode state of a :class:`Transformer`: one cache per block (the list items) and
    ``prev``, the previous token's embedding (B, 1, d) that the token shift reads."""

    def __init__(self, caches: Iterable[Any] = ()) -> None:
        super().__init__(caches)
        self.prev = None
