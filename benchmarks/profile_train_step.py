"""Where one train-toy step spends its time: attention op forward/backward, the other layers,
loss, clipping and the optimizer, batch making, Python/dispatch overhead and allocations.

Each part is timed exclusively (a wrapped function's time less the wrapped functions it
calls), over ``--steps`` steps of the real loop's step (:class:`topkattn.training.train.Trainer`
when present, else the same calls written out), under train-toy's default BLAS thread limit.

* ``overhead floor``: the same step on a one-sequence, 8-token batch (numeric work ~0):
  what Python, NumPy dispatch and the per-call checks cost whatever the size;
* ``allocations``: the kernel (system) time per step and the minor page faults: fresh memory
  the allocator maps and the kernel zeroes for large temporaries.

    python benchmarks/profile_train_step.py                       # default size, dense and k=8
    python benchmarks/profile_train_step.py --size large --steps 3
"""
import argparse
import contextlib
import json
import os
import resource
import sys
import time

PARTS = [  # (label, module, qualified name): timed exclusively; names a version lacks are skipped
    ("attention op fwd", "topkattn.layers.mla", "attention_forward"),
    ("attention op bwd", "topkattn.layers.mla", "attention_backward"),
    ("attention op fwd", "topkattn.layers.mla", "dense_attention_forward"),
    ("attention op fwd", "topkattn.layers.mla", "topk_attention_forward"),
    ("attention op bwd", "topkattn.layers.mla", "dense_attention_backward"),
    ("attention op bwd", "topkattn.layers.mla", "topk_attention_backward"),
    ("MLA projections fwd", "topkattn.layers.mla", "MLA.forward"),
    ("MLA projections bwd", "topkattn.layers.mla", "MLA.backward"),
    ("SwiGLU fwd", "topkattn.layers.swiglu", "SwiGLU.forward"),
    ("SwiGLU bwd", "topkattn.layers.swiglu", "SwiGLU.backward"),
    ("RMSNorm fwd", "topkattn.layers.rmsnorm", "RMSNorm.forward"),
    ("RMSNorm bwd", "topkattn.layers.rmsnorm", "RMSNorm.backward"),
    ("block residuals", "topkattn.layers.block", "Block.forward"),
    ("block residuals", "topkattn.layers.block", "Block.backward"),
    ("embed + shift + logits", "topkattn.layers.embedding", "Embedding.forward"),
    ("embed + shift + logits", "topkattn.layers.embedding", "Embedding.logits"),
    ("embed + shift + logits", "topkattn.layers.embedding", "Embedding.backward"),
    ("embed + shift + logits", "topkattn.layers.embedding", "Embedding.backward_logits"),
    ("embed + shift + logits", "topkattn.layers.token_shift", "TokenShift.forward"),
    ("embed + shift + logits", "topkattn.layers.token_shift", "TokenShift.backward"),
    ("model glue (zero_grad, checks)", "topkattn.model", "Transformer.forward"),
    ("model glue (zero_grad, checks)", "topkattn.model", "Transformer.backward"),
    ("loss", "topkattn.training.train", "softmax_cross_entropy"),
    ("clip", "topkattn.training.train", "clip_grad_norm"),
    ("batch", "topkattn.training.train", "train_batch"),
]
OPTIMIZER = "optimizer"
CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (steadier on a shared machine)


class Clock:
    """Exclusive time per label: a stack of running wrapped calls."""

    def __init__(self):
        self.total = {}
        self.stack = []

    def wrap(self, label, fn):
        def timed(*a, **kw):
            t0 = CLOCK[0]()
            self.stack.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                dt = CLOCK[0]() - t0
                inner = self.stack.pop()
                self.total[label] = self.total.get(label, 0.0) + dt - inner
                if self.stack:
                    self.stack[-1] += dt
        return timed


def install(clock):
    import importlib

    undo = []
    for label, mod_name, qual in PARTS:
        mod = importlib.import_module(mod_name)
        owner, attr = mod, qual
        if "." in qual:
            cls, attr = qual.split(".")
            owner = getattr(mod, cls)
        if not hasattr(owner, attr):
            continue
        fn = getattr(owner, attr)
        setattr(owner, attr, clock.wrap(label, fn))
        undo.append((owner, attr, fn))
    return undo


def make_step(cfg, clock=None):
    """A callable running training step s of ``cfg`` (the train loop's calls)."""
    import importlib

    tr = importlib.import_module("topkattn.training.train")

    if hasattr(tr, "Trainer"):
        trainer = tr.Trainer(cfg)
        if clock is not None:
            trainer.opt_step = clock.wrap(OPTIMIZER, trainer.opt_step)
        return trainer.step
    from topkattn.model import Transformer

    task = tr.make_task(cfg)
    model = Transformer(tr.model_config(cfg, task.vocab_size))
    if hasattr(tr, "make_optimizer"):
        opt = tr.make_optimizer(cfg, model)
    else:  # code from before make_optimizer
        opt = tr.AdamW(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay)
    opt_step = opt.step if clock is None else clock.wrap(OPTIMIZER, opt.step)

    def step(s):
        x, y = tr.train_batch(task, cfg, s)
        logits = model.forward(x, seed=tr.step_seed(cfg.seed, tr.FORGET_STREAM, s))
        loss, dlogits = tr.softmax_cross_entropy(logits, y)
        model.backward(dlogits)
        tr.clip_grad_norm(model.grads, cfg.clip_norm)
        opt_step(model.params, model.grads, lr=1e-3)
        return loss
    return step


def profile(cfg, steps):
    step = make_step(cfg)
    for s in range(2):
        step(s)
    t0 = CLOCK[0]()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for s in range(steps):
        step(s)
    plain = (CLOCK[0]() - t0) / steps
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults = (r1.ru_minflt - r0.ru_minflt) / steps
    sys_s = (r1.ru_stime - r0.ru_stime) / steps  # the kernel's share: mostly mapping and zeroing pages
    clock = Clock()
    undo = install(clock)
    try:
        step = make_step(cfg, clock)
        step(0)
        clock.total.clear()
        t0 = CLOCK[0]()
        for s in range(steps):
            step(s)
        timed = (CLOCK[0]() - t0) / steps
    finally:
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    parts = {k: v / steps for k, v in sorted(clock.total.items(), key=lambda kv: -kv[1])}
    parts["rest (loop, lr, seeds)"] = max(0.0, timed - sum(parts.values()))
    tiny = make_step(cfg.replace(batch_size=1, seq_len=8, num_kv_pairs=2) if hasattr(cfg, "replace")
                     else _tiny(cfg))
    for s in range(3):
        tiny(s)
    t0 = CLOCK[0]()
    for s in range(max(steps, 20)):
        tiny(s)
    floor = (CLOCK[0]() - t0) / max(steps, 20)
    return {"step_s": plain, "instrumented_step_s": timed, "parts_s": parts, "overhead_floor_s": floor,
            "minor_faults_per_step": faults, "sys_s_per_step": sys_s}


def _tiny(cfg):
    import dataclasses

    return dataclasses.replace(cfg, batch_size=1, seq_len=8, num_kv_pairs=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="default", choices=["default", "large"])
    ap.add_argument("--rows", default="dense,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: train's policy by size)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: process CPU time (steadier on a shared machine)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train_toy import cli_blas_threads, peer_config
    from threadpoolctl import threadpool_limits

    blas = cli_blas_threads()
    out = {}
    try:  # the policy train() applies (threads by size, freed memory kept), where this version has one
        from topkattn.threads import cpu_policy, threads_for
        from topkattn.training.train import step_work

        def policy(cfg):
            return cpu_policy(args.threads or threads_for(step_work(cfg)))
    except ImportError:
        def policy(cfg):
            return contextlib.nullcontext()
    fixed = isinstance(blas, int) and blas > 0  # older versions: an int default (a BLAS limit)
    with threadpool_limits(limits=blas, user_api="blas") if fixed else contextlib.nullcontext():
        for row in args.rows.split(","):
            cfg = peer_config(args.size, row.strip())
            with policy(cfg):
                r = profile(cfg, args.steps)
            out[row] = r
            print(f"\n{args.size} {row}: {1e3 * r['step_s']:.1f} ms/step "
                  f"({cfg.batch_size * cfg.seq_len / r['step_s']:,.0f} tok/s); instrumented "
                  f"{1e3 * r['instrumented_step_s']:.1f} ms")
            for k, v in r["parts_s"].items():
                print(f"  {k:32s} {1e3 * v:8.2f} ms  {100 * v / r['instrumented_step_s']:5.1f}%")
            print(f"  {'overhead floor (B=1, T=8 step)':32s} {1e3 * r['overhead_floor_s']:8.2f} ms")
            print(f"  {'allocations (kernel time)':32s} {1e3 * r['sys_s_per_step']:8.2f} ms  "
                  f"({r['minor_faults_per_step']:.0f} page faults/step)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"size": args.size, "blas_threads": blas, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
