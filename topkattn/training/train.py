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

Shape letters: B batch, T sequence length, d model width, V vocabulary.
"""
import dataclasses
import math
import os
import time

import numpy as np

from topkattn.backend import get_array_module, require_cupy, to_numpy
from topkattn.checks import ConfigDict, check_choice, check_int, check_real
from topkattn.layers.loss import softmax_cross_entropy
from topkattn.model import Transformer, TransformerConfig
from topkattn.storage import atomic_write_json, remove_stale_temporaries
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


@dataclasses.dataclass
class TrainConfig(ConfigDict):
    """Everything that defines a training run (and must match its checkpoint to resume)."""

    task: str = "mqar"            # "mqar" | "text"
    attention: str = "topk"       # "topk" | "dense"
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

    def __post_init__(self):
        check_choice("task", self.task, ("mqar", "text"))
        check_choice("attention", self.attention, ("topk", "dense"))
        for name, lo in (("k", 1), ("layers", 1), ("d_model", 1), ("heads", 1), ("seq_len", 2),
                         ("steps", 1), ("batch_size", 1), ("seed", 0), ("vocab_size", 4),
                         ("num_kv_pairs", 1), ("warmup_steps", 0), ("eval_size", 1)):
            check_int(name, getattr(self, name), lo)
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.d_model // self.heads < 4:
            raise ValueError(f"d_model / heads must be at least 4, got {self.d_model}/{self.heads}")
        check_real("forget_rate", self.forget_rate, 0.0, 1.0, hi_open=True)
        for name in ("lr", "clip_norm", "rope_base"):
            check_real(name, getattr(self, name), 0.0, lo_open=True)
        for name in ("weight_decay", "min_lr_ratio", "beta2"):
            check_real(name, getattr(self, name), 0.0, 1.0)
        if not isinstance(self.token_shift, bool):
            raise TypeError(f"token_shift must be True or False, got {self.token_shift!r}")
        if self.task == "mqar":  # the task's own checks (vocabulary and length fit the pairs)
            MQAR(vocab_size=self.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs)


def make_task(cfg):
    """The task object of a config (:class:`MQAR` or :class:`TextCorpus`)."""
    if cfg.task == "mqar":
        return MQAR(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs)
    return TextCorpus(seq_len=cfg.seq_len)


def model_config(cfg, vocab_size):
    """The :class:`TransformerConfig` of a run: MLA, SwiGLU, dims derived from d_model/heads."""
    hd = cfg.d_model // cfg.heads
    rope = max(2, (hd // 2) // 2 * 2)
    return TransformerConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
        attention="mla", q_lora_rank=max(8, cfg.d_model // 2), kv_lora_rank=max(8, cfg.d_model // 2),
        qk_nope_dim=hd, qk_rope_dim=rope, v_head_dim=hd, ffn="swiglu", d_ff=2 * cfg.d_model,
        topk=cfg.k if cfg.attention == "topk" else None, forget_rate=float(cfg.forget_rate),
        rope_base=float(cfg.rope_base), token_shift=cfg.token_shift, dtype="float32", seed=cfg.seed)


def step_seed(seed, stream, step):
    """A 63-bit integer seed for (run seed, stream, step)."""
    ss = np.random.SeedSequence([int(seed), int(stream), int(step)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def train_batch(task, cfg, step):
    """The training batch of step ``step``: ``(inputs, targets)`` int64 (B, T)."""
    rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, step])
    return task.batch(rng, cfg.batch_size)


def heldout_set(task, cfg):
    """The held-out evaluation set (another seed stream than training)."""
    if cfg.task == "mqar":
        return task.batch(np.random.default_rng([cfg.seed, EVAL_STREAM]), cfg.eval_size)
    return task.heldout(cfg.eval_size)


def evaluate(model, task, cfg, batch_size=128):
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


def _rng_state(cfg, step):
    return {"scheme": "SeedSequence([seed, stream, step]); streams train=0 eval=1 forget=2",
            "seed": int(cfg.seed), "next_step": int(step)}


def train(cfg, *, out_dir=None, resume=False, device="cpu", checkpoint_every=100,
          progress=None, log=None, eval_every=None):
    """Train a toy model; returns a :class:`TrainResult` (metrics, per-step losses, model).

    Args:
      cfg: a :class:`TrainConfig`.
      out_dir: folder for ``checkpoint.npz`` (every ``checkpoint_every`` steps and at the
        end), ``metrics.json`` and ``history.json`` (per-step loss and lr); None = no files.
      resume: continue from ``out_dir/checkpoint.npz``; its config must equal ``cfg``
        (:class:`~topkattn.training.checkpoint.ConfigMismatchError` names the fields otherwise), a
        corrupt file raises :class:`~topkattn.training.checkpoint.CheckpointError`.
      device: "cpu" (NumPy) or "gpu" (CuPy; RuntimeError when no GPU is usable).
      progress: called after every step as ``progress(step, loss, lr, tokens_per_s)``
        (step counts from 1).
      log: called with one-line messages (e.g. ``tqdm.write``).
      eval_every: also evaluate on the held-out set every this many steps and ``log`` it.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    check_choice("device", device, ("cpu", "gpu"))
    check_int("checkpoint_every", checkpoint_every, 1)
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir (the folder holding checkpoint.npz)")
    log = log or (lambda msg: None)
    t_start, c_start = time.perf_counter(), time.process_time()
    xp = require_cupy() if device == "gpu" else np

    task = make_task(cfg)
    model = Transformer(model_config(cfg, task.vocab_size))
    if xp is not np:
        model.to_device(xp)
    opt = AdamW(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay)
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

    if out_dir is not None:  # a save killed mid-write (e.g. SIGKILL) leaves its temporary file
        for name in remove_stale_temporaries(out_dir, TEMP_PREFIX):
            log(f"removed {name}, left in {out_dir} by an interrupted save")

    def save(step):
        if ckpt_path is not None:
            save_training_state(ckpt_path, params=model.params, optimizer=opt, step=step,
                                config=cfg.to_dict(), rng=_rng_state(cfg, step),
                                history={"loss": np.asarray(losses, dtype=np.float64),
                                         "lr": np.asarray(lrs, dtype=np.float64)})

    model.train()
    tokens = cfg.batch_size * cfg.seq_len
    min_lr = cfg.lr * cfg.min_lr_ratio
    t_train = time.perf_counter()
    for step in range(start, cfg.steps):
        x, y = train_batch(task, cfg, step)                              # (B, T), (B, T)
        logits = model.forward(xp.asarray(x), seed=step_seed(cfg.seed, FORGET_STREAM, step))
        loss, dlogits = softmax_cross_entropy(logits, xp.asarray(y))    # (B, T, V)
        model.backward(dlogits)
        norm = clip_grad_norm(model.grads, cfg.clip_norm)
        lr = warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                              total_steps=cfg.steps, min_lr=min_lr)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            save(step)
            raise FloatingPointError(f"step {step + 1}: non-finite loss {loss} or gradient norm "
                                     f"{norm}; last good state saved at step {step}")
        opt.step(model.params, model.grads, lr=lr)
        losses.append(float(loss) + float(model.aux_loss))
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
    ev = evaluate(model, task, cfg)
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
        "device": device, "n_params": model.n_params(),
        "config": cfg.to_dict(),
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, HISTORY_NAME), {"loss": losses, "lr": lrs}, prefix=TEMP_PREFIX)
        atomic_write_json(os.path.join(out_dir, METRICS_NAME), metrics, prefix=TEMP_PREFIX)
    return TrainResult(metrics=metrics, losses=np.asarray(losses), model=model)


def load_params(model, saved, path):
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


def saved_config(state):
    """The run config dict of a loaded training state, with the defaults of fields that
    older checkpoints lack (``token_shift``: those runs had none)."""
    cfg = dict(state["config"])
    cfg.setdefault("token_shift", False)
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
