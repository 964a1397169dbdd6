"""Toy training: a small MLA decoder on MQAR or stdlib text, with checkpoints and exact resume.

The loop is a library function (:func:`train`) that the ``topkattn train-toy`` command
calls.  Per step: a batch, forward, softmax cross-entropy, backward, global-norm
clipping, AdamW at the warmup+cosine learning rate.  Every random choice of step s is
a function of ``(seed, s)`` only -- the batch from ``SeedSequence([seed, 0, s])``, the
forgetful masking from ``SeedSequence([seed, 2, s])`` -- so a run resumed from a
checkpoint at step s reproduces the uninterrupted run's losses bit for bit.  The
held-out MQAR set comes from ``SeedSequence([seed, 1])``, a stream training never draws.

The toy model is :class:`topkattn.model.Transformer` (MLA + SwiGLU) with, by default, a
token shift on the embeddings (:mod:`topkattn.layers.token_shift`): x_t + W x_{t-1}, W
initialised to zero.  Recall tasks need a "previous token" feature (the value at position t must know the
key at t-1); attention alone has to discover it as a previous-token head, which on MQAR
costs thousands of steps of plateau for dense and top-k attention alike.  The shift (the
short convolution of RWKV / H3 / Based / Mamba, kernel 2) supplies it, so the top-k vs
dense comparison measures what the attention does with it.  ``token_shift=False`` trains
the bare Transformer.

On NumPy every step's batch is trained as two halves (:data:`DATA_SHARDS`): the model and a
replica sharing its parameter arrays (:func:`model_replica`) each run forward and backward on
one half, and the gradient is their count-weighted sum, always in the same order -- the
numbers do not depend on the thread count.  With two or more threads the halves run at once on
two threads (BLAS at half the threads each): NumPy, BLAS and the Numba kernels release the GIL,
so the step takes about 1.7-1.9x less time on two idle cores than one batch on one, where
threaded BLAS alone gains little at these sizes.  Against one whole-batch pass the sums differ
by float rounding only (the forgetful masking draws the whole batch's block for each half).
Runs with an auxiliary loss (KV experts' load balancing, a function of the whole batch) and
GPU runs keep one pass.

Shape letters: B batch, T sequence length, d model width, V vocabulary.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from topkattn.backend import get_array_module, require_cupy, to_numpy
from topkattn.checks import ConfigDict, check_choice, check_int, check_real
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.layers.module import flatten_parameters, share_parameters
from topkattn.layers.rope import check_rope_base
from topkattn.model import Transformer, TransformerConfig
from topkattn.storage import atomic_write_json, remove_stale_temporaries
from topkattn.threads import cpu_policy, idle_cores, n_workers, pool, threads_for
from topkattn.training.checkpoint import (
    TEMP_PREFIX,
    CheckpointError,
    check_config,
    load_training_state,
    save_training_state,
)
from topkattn.training.optim import AdamW, clip_grad_norm, warmup_cosine_lr
from topkattn.training.tasks import IGNORE, MQAR, TextCorpus

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.json"
TRAIN_STREAM, EVAL_STREAM, FORGET_STREAM = 0, 1, 2
EVAL_BATCH = 128  # held-out sequences per forward in :func:`evaluate`
DATA_SHARDS = 2  # a NumPy step's rows as two halves (module docstring)
HALVES_WORK = 2**22  # step_work from which the two halves run at once (train-toy's default is 2**24)
# the JSON files' temporaries before they went through topkattn.storage: <name>.tmp-<pid>
LEGACY_TEMPORARY = re.compile(r"(history|metrics)\.json\.tmp-[0-9]+")


class OutDirError(OSError):
    """``out_dir`` cannot be created or written; found before the first step (``path``, ``reason``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"out_dir {path} is not a writable folder ({reason})")
        self.path, self.reason = path, reason


class RunExistsError(FileExistsError):
    """``out_dir`` already holds a file the new run would write and the run neither resumes nor
    overwrites it (``path``: the run's checkpoint when there is one, else the first such file,
    e.g. a ``metrics.json`` of the user's); found before the first step, nothing is touched."""

    def __init__(self, path: str) -> None:
        if os.path.basename(path) == CHECKPOINT_NAME:
            message = f"{path} already holds a run's checkpoint: resume it, or overwrite it to start over"
        else:
            message = f"{path} exists and a new run would replace it: overwrite it, or write the run elsewhere"
        super().__init__(message)
        self.path = path


class SaveError(OSError):
    """Writing a checkpoint, metrics.json or history.json into ``out_dir`` failed during the run;
    the files written before are kept."""


class RunTooLargeError(ValueError):
    """A run whose :func:`step_memory_estimate` exceeds the machine's memory (``estimate``,
    ``available``, in bytes)."""

    def __init__(self, message: str, estimate: int, available: int) -> None:
        super().__init__(message)
        self.estimate, self.available = estimate, available


@dataclasses.dataclass
class TrainConfig(ConfigDict):
    """Everything that defines a training run (and must match its checkpoint to resume)."""

    task: str = "mqar"            # "mqar" | "text"
    attention: str = "topk"       # "topk" | "dense" | "block" (block top-k, MoBA: block_size, topk_blocks)
    k: int = 8                    # keys per query with attention="topk"
    forget_rate: float = 0.0
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    seq_len: int = 64
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    vocab_size: int = 64          # mqar only (text is byte level: 256)
    num_kv_pairs: int = 16        # mqar only
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    beta2: float = 0.98
    rope_base: float = 10000.0
    token_shift: bool = True      # x_t + W x_{t-1} on the embeddings (see the module docstring)
    eval_size: int = 512          # held-out sequences (mqar) or windows (text)
    kv_experts: int = 0           # attention variants (TransformerConfig's fields of the same names)
    kv_experts_active: int | None = None
    k_rank: int | None = None
    v_rank: int | None = None
    q_head_dim: int | None = None
    ternary: bool = False
    act_bits: int | None = None
    block_size: int = 16          # attention="block": keys per block
    topk_blocks: int = 2          # attention="block": blocks per query, its own included
    dense_layers: list = dataclasses.field(default_factory=list)  # layers kept dense (hybrid)
    tail: str | None = None       # attention="topk": None | "mean" (dropped softmax mass to the mean unselected value)
    attention_layer: str = "mla"  # "mla" | "mha" (plain multi-head attention, head dim d_model / heads)

    def __post_init__(self):
        self._plain_scalars()
        check_choice("task", self.task, ("mqar", "text"))
        check_choice("attention", self.attention, ("topk", "dense", "block"))
        check_choice("attention_layer", self.attention_layer, ("mla", "mha"))
        check_int("block_size", self.block_size, 1)
        check_int("topk_blocks", self.topk_blocks, 1)
        for name, lo in (("k", 1), ("layers", 1), ("d_model", 1), ("heads", 1), ("seq_len", 2),
                         ("steps", 1), ("batch_size", 1), ("seed", 0), ("vocab_size", 4),
                         ("num_kv_pairs", 1), ("warmup_steps", 0), ("eval_size", 1)):
            check_int(name, getattr(self, name), lo)
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.d_model // self.heads < 4:
            raise ValueError(f"d_model / heads must be at least 4, got {self.d_model}/{self.heads}")
        check_real("forget_rate", self.forget_rate, 0.0, 1.0, hi_open=True)
        for name in ("lr", "clip_norm"):
            check_real(name, getattr(self, name), 0.0, lo_open=True)
        check_rope_base("rope_base", self.rope_base)
        for name in ("weight_decay", "min_lr_ratio"):
            check_real(name, getattr(self, name), 0.0, 1.0)
        check_real("beta2", self.beta2, 0.0, 1.0, hi_open=True)  # AdamW's second-moment decay
        if not isinstance(self.token_shift, bool):
            raise TypeError(f"token_shift must be True or False, got {self.token_shift!r}")
        if self.tail is not None and self.attention != "topk":
            raise ValueError(f"tail applies to attention='topk' (token top-k), got tail={self.tail!r} with "
                             f"attention={self.attention!r}")
        self.dense_layers = list(model_config(self, 64).dense_layers)  # the variants' and dense_layers' checks
        if self.task == "mqar":  # the task's own checks (vocabulary and length fit the pairs)
            MQAR(vocab_size=self.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs)


def make_task(cfg: TrainConfig) -> MQAR | TextCorpus:
    """The task object of a config (:class:`MQAR` or :class:`TextCorpus`)."""
    if cfg.task == "mqar":
        return MQAR(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs)
    return TextCorpus(seq_len=cfg.seq_len)


def model_config(cfg: TrainConfig, vocab_size: int) -> TransformerConfig:
    """The :class:`TransformerConfig` of a run: MLA (or plain attention with ``attention_layer="mha"``),
    SwiGLU, dims derived from d_model/heads."""
    hd = cfg.d_model // cfg.heads
    rope = max(2, (hd // 2) // 2 * 2)
    return TransformerConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
        attention=cfg.attention_layer, q_lora_rank=max(8, cfg.d_model // 2), kv_lora_rank=max(8, cfg.d_model // 2),
        qk_nope_dim=hd, qk_rope_dim=rope, v_head_dim=hd, ffn="swiglu", d_ff=2 * cfg.d_model,
        topk=cfg.k if cfg.attention == "topk" else None, forget_rate=float(cfg.forget_rate),
        selection="block" if cfg.attention == "block" else "token",
        block_size=cfg.block_size if cfg.attention == "block" else None,
        topk_blocks=cfg.topk_blocks if cfg.attention == "block" else None, dense_layers=cfg.dense_layers,
        tail=cfg.tail if cfg.attention == "topk" else None,
        rope_base=float(cfg.rope_base), token_shift=cfg.token_shift, dtype="float32", seed=cfg.seed,
        kv_experts=cfg.kv_experts, kv_experts_active=cfg.kv_experts_active, k_rank=cfg.k_rank, v_rank=cfg.v_rank,
        q_head_dim=cfg.q_head_dim, ternary=cfg.ternary, act_bits=cfg.act_bits)


def make_optimizer(cfg: TrainConfig, model: Transformer) -> AdamW:
    """The AdamW of a run of ``cfg`` over ``model``'s parameters (train-toy's hyper-parameters).

    The parameters and gradients are first moved into one buffer each
    (:func:`topkattn.layers.module.flatten_parameters`; the layers keep views), so that the
    update runs over the whole buffer at once (the same numbers as array by array).
    """
    return AdamW(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay,
                 flat=flatten_parameters(model))


def n_model_params(mc: TransformerConfig) -> int:
    """The parameter count of :func:`model_config`'s model (MLA + SwiGLU, tied head), without
    building it: embedding V d; per layer two RMSNorm gains, MLA's projections and norms, and
    SwiGLU's three matrices; the final norm; the token shift's d x d.  Variants: E KV experts
    (E W_UK, W_UV and the router E x d), separate key/value latents (W_DV, v_norm, persist_cv);
    ``attention="mha"``: W_Q, E expert W_K/W_V, W_O, the router and the persistent keys/values instead."""
    d, H, Lq, C = mc.d_model, mc.n_heads, mc.q_lora_rank, mc.kv_lora_rank
    Dn, R, Dv, Dff, P = mc.qk_nope_dim, mc.qk_rope_dim, mc.v_head_dim, mc.d_ff, mc.persistent_tokens
    Dn = Dn if mc.q_head_dim is None else mc.q_head_dim - R
    split = mc.k_rank is not None or mc.v_rank is not None
    Ck, Cv, E = mc.k_rank or C, mc.v_rank or C, max(1, mc.kv_experts)
    mla = (Lq * d + Lq + H * Dn * Lq + H * R * Lq + Ck * d + Ck + E * H * (Dn * Ck + Dv * Cv) + R * d
           + d * H * Dv + P * (Ck + R) + (Cv * d + Cv + P * Cv if split else 0) + mc.kv_experts * d)
    if mc.attention == "mha":  # W_Q, E expert W_K and W_V (E = 1 without experts), W_O, the router, persistent k/v
        G, Dq = mc.n_kv_heads or H, mc.q_head_dim or mc.head_dim or d // H
        Dv = mc.v_head_dim or Dq
        mla = d * H * Dq + E * G * (Dq + Dv) * d + d * H * Dv + mc.kv_experts * d + P * G * (Dq + Dv)
    per_layer = 2 * d + mla + 3 * d * Dff
    head = 0 if mc.tie_embeddings else mc.vocab_size * d
    return mc.vocab_size * d + mc.n_layers * per_layer + d + head + (d * d if mc.token_shift else 0)


def step_memory_estimate(cfg: TrainConfig) -> int:
    """A lower bound, in bytes, of the peak memory of a training run of ``cfg`` (a :class:`TrainConfig`).

    Counted, with 4 bytes a float32 and 8 an int64 token:

    * the parameters, their gradients and AdamW's two moments: 4 numbers per parameter;
    * a training step of B = batch_size sequences of T = seq_len tokens: the batch (inputs and
      targets, 2 B T int64); what the forward keeps for the backward, per token and layer
      4 d + 2 Lq + 2 C + R + 2 H (Dn + R) + 3 H Dv + 4 Dff numbers (the block's two RMSNorm
      inputs and outputs, MLA's query and KV latents, rope key, per-head queries, keys,
      values and attention outputs, SwiGLU's four hidden vectors; with top-k also the (H, K)
      int64 indices), and per token d (the token shift) + 2 d + 3 V (the final norm, the logits,
      their softmax and gradient); and one row of attention scores per (sequence, head),
      B H T: the smallest tile the chunked attention ops use;
    * the held-out evaluation (MQAR): its inputs and targets (2 eval_size T int64) and the
      forward of one evaluation batch (min(128, eval_size) sequences, counted as above).

    The peak is the parameters and optimizer plus the larger of the training step and the
    evaluation.  Temporaries of the matrix products, the softmax and NumPy's overhead are not
    counted: a run needs more than this.  Used by :func:`train` to refuse runs that cannot fit.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    V = cfg.vocab_size if cfg.task == "mqar" else TextCorpus.vocab_size
    mc = model_config(cfg, V)
    d, H, L, T = mc.d_model, mc.n_heads, mc.n_layers, cfg.seq_len
    per_layer = (4 * d + 2 * mc.q_lora_rank + 2 * mc.kv_lora_rank + mc.qk_rope_dim
                 + 2 * H * (mc.qk_nope_dim + mc.qk_rope_dim) + 3 * H * mc.v_head_dim + 4 * mc.d_ff
                 + (2 * H * min(cfg.k, T) if mc.topk is not None else 0))
    per_token = L * per_layer + (d if mc.token_shift else 0) + 2 * d + 3 * V  # float32 numbers

    def forward_bytes(n_seq):
        return 4 * n_seq * T * per_token + 4 * n_seq * H * T

    train_step = forward_bytes(cfg.batch_size) + 2 * 8 * cfg.batch_size * T
    evaluation = 0
    if cfg.task == "mqar":  # the text task's held-out windows depend on the corpus: not counted
        evaluation = forward_bytes(min(EVAL_BATCH, cfg.eval_size)) + 2 * 8 * cfg.eval_size * T
    return 4 * 4 * n_model_params(mc) + max(train_step, evaluation)


def machine_memory(device: str = "cpu") -> int | None:
    """Bytes of memory a run on ``device`` can use at most: the host's RAM, plus the GPU's memory
    with device "gpu"; None when the platform does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    if device == "gpu":
        total += int(require_cupy().cuda.Device().mem_info[1])
    return total


def check_memory(cfg: TrainConfig, device: str = "cpu") -> None:
    """Raise :class:`RunTooLargeError` when :func:`step_memory_estimate` exceeds :func:`machine_memory`."""
    need, have = step_memory_estimate(cfg), machine_memory(device)
    if have is not None and need > have:
        raise RunTooLargeError(
            f"the run needs at least {format_bytes(need)} of memory (a lower-bound estimate for "
            f"batch_size={cfg.batch_size}, seq_len={cfg.seq_len}, d_model={cfg.d_model}, layers={cfg.layers}), "
            f"more than this machine's {format_bytes(have)}", need, have)


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable string (1024-based units)."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def probe_out_dir(out_dir: str | os.PathLike) -> None:
    """Create ``out_dir`` (and its parents) and write and delete a probe file in it, named as the
    atomic writer names its temporary files (``<TEMP_PREFIX>*.tmp``, so a leftover probe is
    cleaned like one); :class:`OutDirError` naming the folder when any of it fails."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=out_dir)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutDirError(out_dir, e.strerror or str(e)) from e


def check_run_folder(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """:class:`RunExistsError` when ``out_dir`` holds a file (a checkpoint, ``metrics.json``,
    ``history.json``) that a run neither resuming nor overwriting would replace."""
    if resume or overwrite:
        return
    for name in (CHECKPOINT_NAME, METRICS_NAME, HISTORY_NAME):  # the checkpoint first: a run to resume
        existing = os.path.join(os.fspath(out_dir), name)
        if os.path.lexists(existing):
            raise RunExistsError(existing)


def nonfinite_parameter(params: dict[str, Any]) -> str | None:
    """The name of the first parameter in ``params`` (name -> array) holding a NaN or an
    infinity (a diverged run's), or None when every one is finite."""
    for name, p in params.items():
        if not bool(get_array_module(p).isfinite(p).all()):
            return name
    return None


def remove_leftovers(out_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files an interrupted save left in ``out_dir`` (this run's folder):
    the atomic writer's ``<TEMP_PREFIX>*.tmp`` and the older ``history.json.tmp-<pid>`` /
    ``metrics.json.tmp-<pid>``; returns their names.  Other files are left alone."""
    return remove_stale_temporaries(out_dir, TEMP_PREFIX, also=LEGACY_TEMPORARY)


def step_seed(seed: int, stream: int, step: int) -> int:
    """A 63-bit integer seed for (run seed, stream, step)."""
    ss = np.random.SeedSequence([int(seed), int(stream), int(step)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def train_batch(task: MQAR | TextCorpus, cfg: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of step ``step``: ``(inputs, targets)`` int64 (B, T)."""
    rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, step])
    return task.batch(rng, cfg.batch_size)


def heldout_set(task: MQAR | TextCorpus, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The held-out evaluation set (another seed stream than training)."""
    if cfg.task == "mqar":
        return task.batch(np.random.default_rng([cfg.seed, EVAL_STREAM]), cfg.eval_size)
    return task.heldout(cfg.eval_size)


def evaluate(model: Transformer, task: MQAR | TextCorpus, cfg: TrainConfig,
             batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Held-out metrics: mqar -> accuracy and loss; text -> loss and bits per character."""
    x_all, y_all = heldout_set(task, cfg)
    xp = model.xp
    was_training = model.training
    model.eval()
    correct = total = 0
    nll = 0.0
    try:
        for i in range(0, x_all.shape[0], batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            logits = model.forward(xp.asarray(x))                 # (B, T, V)
            n = int((y != IGNORE).sum())
            loss, _ = softmax_cross_entropy(logits, xp.asarray(y))
            nll += loss * n
            pred = to_numpy(logits.argmax(-1))                    # (B, T)
            keep = y != IGNORE
            correct += int((pred[keep] == y[keep]).sum())
            total += n
    finally:
        model.train(was_training)
    out = {"heldout_loss": nll / max(total, 1)}
    if cfg.task == "mqar":
        out["accuracy"] = correct / max(total, 1)
    else:
        out["bits_per_char"] = out["heldout_loss"] / math.log(2)
    return out


@dataclasses.dataclass
class TrainResult:
    metrics: dict
    losses: np.ndarray        # (steps,) training loss of every step, including checkpointed ones
    model: object


class RowSliceGenerator(np.random.Generator):
    """A Generator whose :meth:`random` returns rows ``[row_start, row_start + n)`` of the block
    the plain generator of ``seed`` would draw for ``rows_total`` rows.

    ``np.random.default_rng(seed).random((rows_total, ...))[row_start:row_start + n]`` equals
    ``RowSliceGenerator(seed, row_start, rows_total).random((n, ...))``: a process that holds
    rows ``[row_start, row_start + n)`` of a batch draws the forgetful-masking drops
    (:func:`topkattn.ops.selection.forget_draws`, one ``random((B, H, T, K'))`` per layer) the
    whole-batch run draws for those rows.  Only :meth:`random` slices; it is the one draw
    forgetful masking makes.
    """

    def __init__(self, seed: Any, row_start: int, rows_total: int) -> None:
        super().__init__(np.random.PCG64(seed))  # what np.random.default_rng(seed) builds
        self.row_start, self.rows_total = int(row_start), int(rows_total)

    def random(self, size: tuple[int, ...] | None = None, dtype: Any = np.float64,
               out: np.ndarray | None = None) -> np.ndarray:
        if size is None or out is not None or np.ndim(size) == 0:
            raise TypeError("RowSliceGenerator.random needs a shape tuple (rows, ...) and no out")
        size = tuple(int(n) for n in size)
        if self.row_start + size[0] > self.rows_total:
            raise ValueError(f"rows [{self.row_start}, {self.row_start + size[0]}) do not fit in a "
                             f"batch of {self.rows_total}")
        full = super().random((self.rows_total,) + size[1:], dtype=dtype)
        return full[self.row_start:self.row_start + size[0]]


def _forward(model, x, seed, rows, total):
    """``model.forward(x, seed=seed)``; with ``rows`` = (start, stop) of a batch of ``total``
    sequences, the forgetful masking draws what the whole batch would for those rows (each
    layer's seed becomes a :class:`RowSliceGenerator`)."""
    if rows is None or not model.cfg.forget_rate:
        return model.forward(x, seed=seed)
    gens = [RowSliceGenerator(s, rows[0], total) for s in model.layer_seeds(seed)]
    model.layer_seeds = lambda _seed: gens  # this forward only: the instance attribute shadows the method
    try:
        return model.forward(x, seed=seed)
    finally:
        del model.layer_seeds


def trains_in_halves(cfg: TrainConfig, xp: Any, rows: int) -> bool:
    """Whether a run of ``cfg`` trains each step's ``rows`` rows as two halves (module
    docstring): on NumPy, with two rows or more, and without an auxiliary loss (KV experts)."""
    return xp is np and rows >= DATA_SHARDS and not cfg.kv_experts


def run_threads(cfg: TrainConfig, device: str = "cpu") -> int:
    """The CPU threads ``threads="auto"`` gives a run: where its steps go in two halves
    (:func:`trains_in_halves`) and a step has at least :data:`HALVES_WORK` multiply-adds
    (:func:`step_work`), the idle cores up to the worker count (the halves run at once); else
    :func:`topkattn.threads.threads_for` by the step's size (BLAS threads)."""
    if device == "cpu" and trains_in_halves(cfg, np, cfg.batch_size) and step_work(cfg) >= HALVES_WORK:
        return max(1, min(n_workers(), idle_cores()))
    return threads_for(step_work(cfg))


def model_replica(model: Transformer) -> tuple[Transformer, Any]:
    """``(replica, flat)``: a copy of ``model`` holding the same parameter arrays (an in-place
    update of one is the other's) with its own gradients and saved activations -- the model of a
    step's second half -- and its gradients' :class:`~topkattn.layers.module.FlatParameters`
    (one buffer; None when they cannot be one)."""
    replica = copy.deepcopy(model)
    flat = flatten_parameters(replica)  # before sharing: flattening copies the parameters
    share_parameters(model, replica)
    return replica, flat


def _step_in_halves(model, halves, x, y, seed, row0, total, parallel):
    """Forward and backward of the two halves of the rows x, y (B, T) on ``model`` and the replica
    (at once on two threads with ``parallel``); leaves in ``model.grads`` the count-weighted sum
    of their gradients, the first half's first (so the numbers do not depend on ``parallel``),
    and returns the rows' loss.  Rows ``row0 ..`` of a batch of ``total`` (the forgetful masking
    draws the whole batch's block)."""
    replica, g_model, g_replica = halves
    B = x.shape[0]
    parts = [(0, (B + 1) // 2), ((B + 1) // 2, B)]
    counts = [int((y[a:b] != IGNORE).sum()) for a, b in parts]
    xp = get_array_module(g_model)

    def half(i):
        m, (a, b) = (model, replica)[i], parts[i]
        logits = _forward(m, xp.asarray(x[a:b]), seed, (row0 + a, row0 + b), total)
        loss, dlogits = softmax_cross_entropy(logits, xp.asarray(y[a:b]))  # (B/2, T, V)
        m.backward(dlogits)
        return loss

    if parallel:
        job = pool().submit(half, 1)
        try:
            loss0 = half(0)
        finally:
            loss1 = job.result()  # waited for even when the first half raised
    else:
        loss0, loss1 = half(0), half(1)
    n = max(sum(counts), 1)
    w0, w1 = counts[0] / n, counts[1] / n  # each half's loss is a mean over its scored targets
    g_model *= g_model.dtype.type(w0)
    g_model += g_model.dtype.type(w1) * g_replica
    return w0 * loss0 + w1 * loss1


def check_batch_slice(batch_slice: tuple[int, int] | list[int] | None, batch_size: int) -> tuple[int, int] | None:
    """``batch_slice`` as a (start, stop) pair of ints with 0 <= start < stop <= batch_size, or None."""
    if batch_slice is None:
        return None
    if not (isinstance(batch_slice, (tuple, list)) and len(batch_slice) == 2):
        raise TypeError(f"batch_slice must be a (start, stop) pair, got {batch_slice!r}")
    start = check_int("batch_slice start", batch_slice[0], 0)
    stop = check_int("batch_slice stop", batch_slice[1], 1)
    if not start < stop <= batch_size:
        raise ValueError(f"batch_slice must satisfy 0 <= start < stop <= batch_size ({batch_size}), "
                         f"got {tuple(batch_slice)}")
    return start, stop


def _rng_state(cfg, step):
    return {"scheme": "SeedSequence([seed, stream, step]); streams train=0 eval=1 forget=2",
            "seed": int(cfg.seed), "next_step": int(step)}


def step_work(cfg: TrainConfig) -> int:
    """Multiply-adds of the largest matrix product of a training step of ``cfg`` (tokens times
    d_model times the wider of the feed-forward width and the vocabulary): the size the CPU
    thread policy (:func:`topkattn.threads.threads_for`) is chosen by."""
    V = cfg.vocab_size if cfg.task == "mqar" else TextCorpus.vocab_size
    return cfg.batch_size * cfg.seq_len * cfg.d_model * max(2 * cfg.d_model, V)


def train(cfg: TrainConfig, *, out_dir: str | os.PathLike | None = None, resume: bool = False, device: str = "cpu",
          checkpoint_every: int = 100, progress: Callable[[int, float, float, float], Any] | None = None,
          log: Callable[[str], Any] | None = None, eval_every: int | None = None,
          batch_slice: tuple[int, int] | None = None,
          reduce_grads: Callable[[dict, dict, float, float, float], tuple[float, float]] | None = None,
          is_writer: bool = True, after_setup: Callable[[BaseException | None], Any] | None = None,
          threads: int | str = "auto", overwrite: bool = False) -> TrainResult:
    """Train a toy model; returns a :class:`TrainResult` (metrics, per-step losses, model).

    Args:
      cfg: a :class:`TrainConfig`.
      out_dir: folder for ``checkpoint.npz`` (every ``checkpoint_every`` steps and at the
        end), ``metrics.json`` and ``history.json`` (per-step loss and lr); None = no files.
        It is created and probed (a file written and deleted) before the first step:
        :class:`OutDirError` if that fails; a write failing later raises :class:`SaveError`
        and keeps the files written before.  Temporary files an interrupted save left
        there are removed.
      overwrite: without ``resume``, an ``out_dir`` that already holds a file the run writes
        (a checkpoint, metrics.json, history.json) raises :class:`RunExistsError` before
        anything is written, unless this is True: the new run's files then replace those, each
        when the new run first writes it (the checkpoint at the first save, metrics.json at the end).
      resume: continue from ``out_dir/checkpoint.npz``; its config must equal ``cfg``
        (:class:`~topkattn.training.checkpoint.ConfigMismatchError` names the fields otherwise), a
        corrupt file raises :class:`~topkattn.training.checkpoint.CheckpointError`.
      device: "cpu" (NumPy) or "gpu" (CuPy; RuntimeError when no GPU is usable).
      progress: called after every step as ``progress(step, loss, lr, tokens_per_s)``
        (step counts from 1).
      log: called with one-line messages (e.g. ``tqdm.write``).
      eval_every: also evaluate on the held-out set every this many steps and ``log`` it (0 or
        None: never).
      threads: CPU threads for BLAS and the worker pool while training: "auto" (default) by
        the step's size (:func:`step_work`, :func:`topkattn.threads.threads_for`: one thread
        for train-toy's default size), an int, or None to leave the settings as they are.
        Any choice but None also keeps freed memory for reuse
        (:func:`topkattn.threads.keep_freed_memory`).  The count is ``metrics["threads"]``.

    Hooks for data parallelism (:mod:`topkattn.distributed.data_parallel` passes them; plain
    callables, so this module needs no MPI):

      batch_slice: (start, stop): train on these rows of every step's batch only.  The
        forgetful masking draws what the whole batch draws for these rows.
      reduce_grads: called after the backward as ``reduce_grads(params, grads, loss, aux,
        weight)`` with ``weight`` = this process's scored targets / the batch's; it must
        replace ``grads`` in place by the whole batch's gradient (the weighted sum over the
        processes) and return the whole batch's ``(loss, aux)``.  Clipping and AdamW follow.
      is_writer: False: write no file (another process writes them); resume still reads.
      after_setup: called once before the first step with the exception setting up raised
        (the checks, resume, out_dir) or None; it may raise (e.g. agree across processes).

    A run whose :func:`step_memory_estimate` (a lower bound) exceeds the machine's memory is
    refused with :class:`RunTooLargeError` before anything is allocated.  A non-finite loss or
    gradient norm raises FloatingPointError (with ``out_dir`` the last state is saved when its
    parameters are finite; a checkpoint with a non-finite parameter is never written, a save
    finding one raises FloatingPointError and keeps the checkpoint on disk).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if threads is not None and threads != "auto":
        check_int("threads", threads, 1)
    eval_every = check_int("eval_every", eval_every, 0, optional=True)  # 0 or None: never
    n_threads = run_threads(cfg, device) if threads == "auto" else threads
    with cpu_policy(n_threads) if n_threads is not None else contextlib.nullcontext():
        result = _train(cfg, out_dir=out_dir, resume=resume, device=device, checkpoint_every=checkpoint_every,
                        progress=progress, log=log, eval_every=eval_every, batch_slice=batch_slice,
                        reduce_grads=reduce_grads, is_writer=is_writer, after_setup=after_setup,
                        n_threads=n_threads, overwrite=overwrite)
    return result


def _train(cfg, *, out_dir, resume, device, checkpoint_every, progress, log, eval_every, batch_slice,
           reduce_grads, is_writer, after_setup, n_threads, overwrite):
    """The body of :func:`train` (arguments as there), under its thread policy."""
    try:  # everything that can fail before step 1
        check_choice("device", device, ("cpu", "gpu"))
        check_int("checkpoint_every", checkpoint_every, 1)
        batch_slice = check_batch_slice(batch_slice, cfg.batch_size)
        if resume and out_dir is None:
            raise ValueError("resume needs out_dir (the folder holding checkpoint.npz)")
        if cfg.forget_rate and cfg.attention == "dense" and not resume:  # (older runs so made still resume)
            raise ValueError(f"forget_rate applies to attention='topk' (dense attention drops no key), got "
                             f"forget_rate={cfg.forget_rate!r} with attention='dense'")
        if out_dir is not None:
            out_dir = os.fspath(out_dir)
            if is_writer:  # the only process that writes there
                check_run_folder(out_dir, resume=resume, overwrite=overwrite)
        check_memory(cfg, device)
        log = log or (lambda msg: None)
        t_start, c_start = time.perf_counter(), time.process_time()
        xp = require_cupy() if device == "gpu" else np

        task = make_task(cfg)
        model = Transformer(model_config(cfg, task.vocab_size))
        if xp is not np:
            model.to_device(xp)
        opt = make_optimizer(cfg, model)
        losses, lrs = [], []
        start = 0
        ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME) if out_dir is not None else None
        if resume:
            if not os.path.exists(ckpt_path):
                raise CheckpointError(f"cannot resume: no checkpoint at {ckpt_path}")
            state = load_training_state(ckpt_path)
            check_config(saved_config(state), cfg.to_dict(), path=ckpt_path)
            load_params(model, state["params"], ckpt_path)
            _load_optimizer(opt, state["optimizer"], model.params, ckpt_path)
            start = int(state["step"])
            if not 0 <= start <= cfg.steps:
                raise CheckpointError(f"checkpoint {ckpt_path} is at step {start}, outside 0..{cfg.steps}")
            losses = [float(v) for v in state["history"].get("loss", [])]
            lrs = [float(v) for v in state["history"].get("lr", [])]
            if len(losses) != start or len(lrs) != start:
                raise CheckpointError(f"checkpoint {ckpt_path} is corrupted: step {start} but "
                                      f"{len(losses)} recorded losses")
            log(f"resumed from {ckpt_path} at step {start}/{cfg.steps}")

        if out_dir is not None and is_writer:
            probe_out_dir(out_dir)  # before step 1: an unusable folder must not cost the run's work
            for name in remove_leftovers(out_dir):  # a save killed mid-write (e.g. SIGKILL) leaves its temporary
                log(f"removed {name}, left in {out_dir} by an interrupted save")
    except Exception as e:
        if after_setup is not None:
            after_setup(e)  # e.g. every process raises, not only this one
        raise
    if after_setup is not None:
        after_setup(None)
    saved_at = start if resume else None  # the step of the newest checkpoint on disk

    def kept():
        return "no checkpoint was written" if saved_at is None else f"the checkpoint of step {saved_at} is kept"

    def write_failed(what, e):
        return SaveError(f"cannot write {what} in {out_dir} ({e.strerror or e}); {kept()}")

    def save(step):
        nonlocal saved_at
        if ckpt_path is None:
            return
        bad = nonfinite_parameter(model.params)  # on every rank (the replicas are equal): all raise alike
        if bad is not None:  # never replace a good checkpoint by a diverged state
            raise FloatingPointError(f"step {step}: parameter {bad!r} is no longer finite (the run diverged); "
                                     f"{kept()}")
        if not is_writer:
            return
        try:
            save_training_state(ckpt_path, params=model.params, optimizer=opt, step=step,
                                config=cfg.to_dict(), rng=_rng_state(cfg, step),
                                history={"loss": np.asarray(losses, dtype=np.float64),
                                         "lr": np.asarray(lrs, dtype=np.float64)})
        except OSError as e:
            raise write_failed(f"the checkpoint of step {step}", e) from e
        saved_at = step

    model.train()
    tokens = cfg.batch_size * cfg.seq_len
    min_lr = cfg.lr * cfg.min_lr_ratio
    rows = cfg.batch_size if batch_slice is None else batch_slice[1] - batch_slice[0]
    halves = None  # the second half's model and the two gradient buffers (module docstring)
    if trains_in_halves(cfg, xp, rows) and opt.flat is not None:
        replica, flat = model_replica(model)
        if flat is not None and flat.slices == opt.flat.slices:
            halves = (replica, opt.flat.grads, flat.grads)
    parallel = halves is not None and (n_threads or 1) >= 2
    steps_policy = contextlib.ExitStack()  # two halves at once: BLAS and workers at half the threads each
    if parallel:
        steps_policy.enter_context(cpu_policy(max(1, n_threads // DATA_SHARDS)))
    t_train = time.perf_counter()
    with steps_policy:
        for step in range(start, cfg.steps):
            x, y = train_batch(task, cfg, step)                              # (B, T), (B, T)
            weight = 1.0
            if batch_slice is not None:  # this process's rows; its share of the scored targets
                n_all = int((y != IGNORE).sum())
                x, y = x[batch_slice[0]:batch_slice[1]], y[batch_slice[0]:batch_slice[1]]
                weight = int((y != IGNORE).sum()) / max(n_all, 1)
            seed = step_seed(cfg.seed, FORGET_STREAM, step)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a diverging step: checked below
                if halves is None:
                    logits = _forward(model, xp.asarray(x), seed, batch_slice, cfg.batch_size)
                    loss, dlogits = softmax_cross_entropy(logits, xp.asarray(y))    # (B, T, V)
                    model.backward(dlogits)
                else:  # model.grads: the count-weighted sum of the two halves' gradients
                    loss = _step_in_halves(model, halves, x, y, seed, 0 if batch_slice is None else batch_slice[0],
                                           cfg.batch_size, parallel)
                aux = float(model.aux_loss)
                if reduce_grads is not None:  # the whole batch's gradient, loss and aux loss
                    loss, aux = reduce_grads(model.params, model.grads, loss, aux, weight)
                norm = clip_grad_norm(model.grads, cfg.clip_norm)
            lr = warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                  total_steps=cfg.steps, min_lr=min_lr)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                if ckpt_path is None:
                    state = "the state was not saved (no out_dir)"
                elif not is_writer:
                    state = "the writing process saves the last good state (when finite)"
                else:
                    try:
                        save(step)
                        state = f"last good state saved at step {step} in {ckpt_path}"
                    except SaveError as e:
                        state = f"the last good state could not be saved: {e}"
                    except FloatingPointError:  # save's own check: the update of step `step` overflowed
                        state = f"the parameters after step {step} are not finite, not saved; {kept()}"
                raise FloatingPointError(f"step {step + 1}: non-finite loss {loss} or gradient norm "
                                         f"{norm}; {state}")
            with np.errstate(over="ignore", invalid="ignore"):  # an overflowing update: the next step stops the run
                opt.step(model.params, model.grads, lr=lr)
            losses.append(float(loss) + float(aux))
            lrs.append(lr)
            done = step + 1
            if progress is not None:
                elapsed = time.perf_counter() - t_train
                progress(done, losses[-1], lr, (done - start) * tokens / max(elapsed, 1e-9))
            if done % checkpoint_every == 0 or done == cfg.steps:
                save(done)
            if eval_every and done % eval_every == 0 and done < cfg.steps:
                ev = evaluate(model, task, cfg)
                log(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    if xp is not np:
        xp.cuda.Device().synchronize()
    train_seconds = time.perf_counter() - t_train
    steps_run = cfg.steps - start
    model.enable_attention_stats()  # what the trained layers attend on the held-out set
    ev = evaluate(model, task, cfg)
    attention_stats = model.attention_stats()
    model.enable_attention_stats(False)
    tail = losses[-min(len(losses), 20):]
    metrics = {
        "task": cfg.task, "attention": cfg.attention,
        "k": cfg.k if cfg.attention == "topk" else None,
        "forget_rate": float(cfg.forget_rate), "steps": cfg.steps,
        "train_loss": float(np.mean(tail)), "last_loss": losses[-1],
        **ev,
        "tokens_per_s": steps_run * tokens / train_seconds if steps_run and train_seconds > 0 else None,
        "seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - c_start,
        "steps_this_run": steps_run, "resumed_from": start if resume else None,
        "device": device, "n_params": model.n_params(), "threads": n_threads,
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "attention_stats": attention_stats,
        "config": cfg.to_dict(),
    }
    if out_dir is not None and is_writer:
        for name, obj in ((HISTORY_NAME, {"loss": losses, "lr": lrs}), (METRICS_NAME, metrics)):
            try:
                atomic_write_json(os.path.join(out_dir, name), obj, prefix=TEMP_PREFIX)
            except OSError as e:
                raise write_failed(name, e) from e
    return TrainResult(metrics=metrics, losses=np.asarray(losses), model=model)


def load_params(model: Transformer, saved: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Copy checkpoint arrays ``saved`` (name -> array) into ``model.params``; CheckpointError
    naming ``path`` when a name, shape or dtype does not fit."""
    have, got = set(model.params), set(saved)
    if have != got:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing "
                              f"{sorted(have - got)[:5]}, unexpected {sorted(got - have)[:5]}")
    for name, p in model.params.items():
        a = saved[name]
        if tuple(a.shape) != tuple(p.shape) or a.dtype != to_numpy(p[:0]).dtype:
            raise CheckpointError(f"checkpoint {path}: parameter {name!r} has shape {a.shape} "
                                  f"{a.dtype}, the model wants {tuple(p.shape)} {p.dtype}")
        p[...] = get_array_module(p).asarray(a)


def saved_config(state: dict[str, Any]) -> dict[str, Any]:
    """The run config dict of a loaded training state, with the defaults of fields that
    older checkpoints lack (``token_shift``: those runs had none; the others: TrainConfig's)."""
    cfg = dict(state["config"])
    cfg.setdefault("token_shift", False)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in cfg:
            cfg[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return cfg


def _load_optimizer(opt, state, params, path):
    """AdamW state from a checkpoint; moments must match the parameters they belong to."""
    for slot in ("m", "v"):
        extra = sorted(set(state[slot]) - set(params))
        if extra:
            raise CheckpointError(f"checkpoint {path}: optimizer moments for unknown parameters {extra[:5]}")
        for name, a in state[slot].items():
            if tuple(a.shape) != tuple(params[name].shape):
                raise CheckpointError(f"checkpoint {path}: optimizer {slot}[{name!r}] has shape {a.shape}, "
                                      f"the parameter has {tuple(params[name].shape)}")
    try:
        opt.load_state_dict(state, like=params)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} has a corrupted optimizer state: {e}") from e
