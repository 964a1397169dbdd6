"""Benchmark: `topkattn train-toy` with dense attention vs top-k attention (k = 2, 4, 8, 16).

Every configuration runs the real command in its own process (same seed, same step and
batch budget, the command's defaults otherwise) and reports held-out quality, the final
training loss, throughput, wall time and the process's CPU time (user + sys of the child:
on a shared machine CPU time is the steadier measure).  The default `--k 8` run must reach
>= 99% held-out MQAR accuracy; the script flags rows that miss it.

    python benchmarks/bench_train_toy.py                      # mqar, defaults, all rows
    python benchmarks/bench_train_toy.py --rows dense,8 --json out.json
    python benchmarks/bench_train_toy.py --task text --steps 500 -- --seq-len 64

Arguments after `--` go to every train-toy invocation unchanged.

`--peer torch` compares train-toy's training loop with the same model written in PyTorch
eager (benchmarks/torch_toy_model.py): for each size and attention it first CHECKS that both
compute the same loss and gradients, and the same parameters after one clipped AdamW step, from
the same weights on one batch (float64, relative tolerance 1e-9), then times both on the same
batches, rounds interleaved (topkattn, torch at each thread count, ...), best round each, and
reports tokens/s and topkattn / best-torch:

    python benchmarks/bench_train_toy.py --peer torch                  # default + large, dense + k=8
    python benchmarks/bench_train_toy.py --peer torch --sizes default --rounds 5

topkattn runs :func:`topkattn.training.train.train` with the command's default
--blas-threads (auto: threads by the step's size and the idle cores; the count used is in the
JSON rows, ``topkattn_threads``); torch runs at 1 and 2 threads (``torch.set_num_threads``), the better counts.
On a shared machine wall time swings with the other processes' load; the last columns compare
the one-thread contenders by CPU seconds per step as well (steadier; torch at 2 threads is left
out there, its CPU time counts both threads).
Results go to benchmarks/results/train_toy_vs_torch.json (``--json`` to change).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(row, args, extra):
    cmd = [sys.executable, "-c", "from topkattn.cli.main import main; main()", "train-toy",
           "--task", args.task, "--seed", str(args.seed), "--json", "--quiet"]
    if row == "dense":
        cmd += ["--attention", "dense"]
    else:
        cmd += ["--attention", "topk", "--k", str(int(row))]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.forget_rate and row != "dense":  # dense attention drops no key (train-toy refuses it)
        cmd += ["--forget-rate", str(args.forget_rate)]
    cmd += extra
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(args.threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"train-toy failed for row {row!r} (exit {proc.returncode}):\n{proc.stderr}")
    m = json.loads(proc.stdout)
    m["process_wall_s"] = wall
    m["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m["row"] = row
    return m


def main():
    if "--peer" in sys.argv[1:]:
        return main_peer()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mqar", choices=["mqar", "text"])
    ap.add_argument("--rows", default="dense,2,4,8,16",
                    help="comma-separated: 'dense' and/or k values (default: dense,2,4,8,16)")
    ap.add_argument("--steps", type=int, default=None, help="override the command's default steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forget-rate", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="set OPENBLAS/OMP/MKL/NUMBA thread counts in the children")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the rows to this file")
    ap.add_argument("--peer", choices=["torch"],
                    help="time train-toy's loop against the same model in PyTorch instead "
                         "(its own options: --peer torch --help)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]  # after "--": train-toy's own options
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r != "dense" and not r.isdigit():
            ap.error(f"--rows: expected 'dense' or an integer k, got {r!r}")
    results = []
    for r in rows:
        m = run_one(r, args, extra)
        results.append(m)
        print(f"done {r}: {json.dumps({k: m[k] for k in ('train_loss', 'seconds')})}",
              file=sys.stderr, flush=True)

    qual = "accuracy" if args.task == "mqar" else "bits/char"
    head = ["attention", "k", "steps", "train loss", qual, "tokens/s", "train+eval s",
            "process wall s", "process cpu s"]
    table = []
    for m in results:
        q = f"{100 * m['accuracy']:.2f}%" if args.task == "mqar" else f"{m['bits_per_char']:.3f}"
        if args.task == "mqar" and m["attention"] == "topk" and m["k"] == 8 and m["accuracy"] < 0.99:
            q += " (<99%!)"
        table.append([m["attention"], "-" if m["k"] is None else str(m["k"]), str(m["steps"]),
                      f"{m['train_loss']:.4f}", q, f"{m['tokens_per_s']:,.0f}", f"{m['seconds']:.1f}",
                      f"{m['process_wall_s']:.1f}", f"{m['process_cpu_s']:.1f}"])
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths)))
    dense = [m for m in results if m["attention"] == "dense"]
    if dense:
        d = dense[0]
        print("\ntime relative to dense (process wall / cpu): " + ", ".join(
            f"k={m['k']}: {m['process_wall_s'] / d['process_wall_s']:.2f}x / "
            f"{m['process_cpu_s'] / d['process_cpu_s']:.2f}x" for m in results if m is not d))
    if args.json_path:
        from topkattn.storage import atomic_write_json

        atomic_write_json(args.json_path, {"task": args.task, "seed": args.seed, "extra_args": extra,
                                           "rows": results}, prefix=".bench-")


# -- --peer torch -------------------------------------------------------------------------------
SIZES = {"default": {}, "large": {"d_model": 256, "heads": 8, "seq_len": 256}}
STEPS = {"default": 16, "large": 3}  # timed steps per round (one more runs untimed first)


def peer_config(size, row, **extra):
    from topkattn.training.train import TrainConfig

    att = {"attention": "dense"} if row == "dense" else {"attention": "topk", "k": int(row)}
    return TrainConfig(**SIZES[size], **att, **extra)


def check_peer(cfg, check_batch):
    """Assert that topkattn and the torch peer agree in float64 on one batch: the loss, every
    gradient, and every parameter after one clipped AdamW step.  Returns the worst relative errors."""
    import dataclasses

    import torch
    from torch_toy_model import from_topkattn, grads_by_name, make_adamw, params_by_name

    from topkattn.layers.loss import softmax_cross_entropy
    from topkattn.model import Transformer
    from topkattn.training.optim import clip_grad_norm
    from topkattn.training.train import make_optimizer, make_task, model_config, train_batch

    task = make_task(cfg)
    model = Transformer(dataclasses.replace(model_config(cfg, task.vocab_size), dtype="float64"))
    rng = np.random.default_rng(1)  # a non-zero token shift, so that its path is checked too
    model.params["shift.weight"][...] = 0.1 * rng.standard_normal(model.params["shift.weight"].shape)
    peer = from_topkattn(model, torch.float64)
    x, y = (a[:check_batch] for a in train_batch(task, cfg, 0))
    loss, dlogits = softmax_cross_entropy(model.forward(x), y)
    model.backward(dlogits)
    t_loss = peer.loss(torch.tensor(x), torch.tensor(y))
    t_loss.backward()
    err = {"loss": abs(loss - t_loss.item()) / abs(loss)}
    tg = grads_by_name(peer)
    assert set(tg) == set(model.grads), "the peer's parameters differ from topkattn's"
    err["grads"] = max(_rel_err(tg[n], model.grads[n]) for n in tg)
    lr = 0.5 * cfg.lr
    clip_grad_norm(model.grads, cfg.clip_norm)
    make_optimizer(cfg, model).step(model.params, model.grads, lr=lr)
    torch.nn.utils.clip_grad_norm_(peer.parameters(), cfg.clip_norm)
    opt = make_adamw(peer, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    tp = params_by_name(peer)
    err["params_after_step"] = max(_rel_err(tp[n], model.params[n]) for n in tp)
    for what, e in err.items():
        assert e < 1e-9, f"topkattn and the torch peer disagree ({what}: relative error {e:.2e}) for {cfg}"
    return err


def _rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


USED_THREADS = []  # the thread count each time_topkattn run trained with (train's metrics["threads"])


def time_topkattn(cfg, blas_threads):
    """(wall, CPU) seconds per step of topkattn.training.train.train over cfg.steps - 1 steps (the
    first untimed), with the command's --blas-threads default: "auto" (train's own policy, what the
    command passes), or an int (older versions: a BLAS limit around train)."""
    from threadpoolctl import threadpool_limits

    from topkattn.training.train import train

    stamps = []
    fixed = isinstance(blas_threads, int) and blas_threads > 0
    with threadpool_limits(limits=blas_threads, user_api="blas") if fixed else _nothing():
        res = train(cfg, progress=lambda *a: stamps.append((time.perf_counter(), time.process_time())))
    USED_THREADS.append(res.metrics.get("threads"))
    return _per_step(stamps)


def _per_step(stamps):
    """(wall, CPU) seconds per step between the first and the last of (perf_counter, process_time) stamps."""
    n = len(stamps) - 1
    return ((stamps[-1][0] - stamps[0][0]) / n, (stamps[-1][1] - stamps[0][1]) / n)


def time_baseline(cfg, blas_threads, tree):
    """:func:`time_topkattn` of the checkout ``tree`` (an older commit: ``git worktree add``), in a
    child process importing topkattn from there."""
    code = ("import dataclasses, json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
            "from bench_train_toy import time_topkattn; from topkattn.training.train import TrainConfig;"
            "names = {f.name for f in dataclasses.fields(TrainConfig)};"  # fields the older code knows
            "kw = {k: v for k, v in json.loads(sys.argv[3]).items() if k in names};"
            "b = sys.argv[4]; print(*time_topkattn(TrainConfig(**kw), b if b == 'auto' else int(b)))")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)),
                          os.path.abspath(tree), json.dumps(cfg.to_dict()), str(blas_threads or 0)],
                         env=env, capture_output=True, text=True, cwd=os.path.abspath(tree))
    if out.returncode != 0:
        raise SystemExit(f"baseline run in {tree} failed:\n{out.stderr}")
    return tuple(float(v) for v in out.stdout.strip().splitlines()[-1].split())


def time_torch(cfg, threads):
    """(wall, CPU) seconds per step of the torch peer (same weights, batches and lr schedule), first step untimed."""
    import torch
    from torch_toy_model import from_topkattn, make_adamw, train_step

    from topkattn.model import Transformer
    from topkattn.training.optim import warmup_cosine_lr
    from topkattn.training.train import make_task, model_config, train_batch

    torch.set_num_threads(threads)
    task = make_task(cfg)
    peer = from_topkattn(Transformer(model_config(cfg, task.vocab_size)))
    opt = make_adamw(peer, cfg)
    stamps = []
    for step in range(cfg.steps):
        x, y = train_batch(task, cfg, step)
        lr = warmup_cosine_lr(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                              min_lr=cfg.lr * cfg.min_lr_ratio)
        train_step(peer, opt, torch.from_numpy(x), torch.from_numpy(y), lr, cfg.clip_norm)
        stamps.append((time.perf_counter(), time.process_time()))
    return _per_step(stamps)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cli_blas_threads():
    """The default of train-toy's --blas-threads (what a user gets)."""
    from topkattn.cli.train_toy import train_toy

    return next(p.default for p in train_toy.params if p.name == "blas_threads")


def main_peer():
    ap = argparse.ArgumentParser(description="train-toy vs the same model in PyTorch eager")
    ap.add_argument("--peer", choices=["torch"], required=True)
    ap.add_argument("--sizes", default="default,large", help="comma-separated: default, large")
    ap.add_argument("--rows", default="dense,8", help="comma-separated: 'dense' and/or k values")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best one kept)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 16 / 3 by size)")
    ap.add_argument("--torch-threads", default="1,2")
    ap.add_argument("--check-batch", type=int, default=8, help="sequences in the float64 check batch")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time train() of this checkout (e.g. a worktree of an older commit), in the same rounds")
    ap.add_argument("--json", dest="json_path",
                    default=os.path.join(ROOT, "benchmarks", "results", "train_toy_vs_torch.json"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: expected default or large, got {s!r}")
    for r in rows:
        if r != "dense" and not r.isdigit():
            ap.error(f"--rows: expected 'dense' or an integer k, got {r!r}")
    torch_threads = [int(t) for t in args.torch_threads.split(",")]
    blas = cli_blas_threads()
    results = []
    for size in sizes:
        for row in rows:
            steps = (args.steps or STEPS[size]) + 1
            cfg = peer_config(size, row, steps=steps, warmup_steps=min(30, steps), eval_size=32)
            err = check_peer(cfg, args.check_batch)
            print(f"{size} {row}: float64 check passed ({', '.join(f'{k} {v:.1e}' for k, v in err.items())})",
                  file=sys.stderr, flush=True)
            runs = {"topkattn": [], **{f"torch{t}": [] for t in torch_threads}}
            USED_THREADS.clear()
            if args.baseline:
                runs["baseline"] = []
            for _ in range(args.rounds):
                runs["topkattn"].append(time_topkattn(cfg, blas))
                if args.baseline:
                    runs["baseline"].append(time_baseline(cfg, blas, args.baseline))
                for t in torch_threads:
                    runs[f"torch{t}"].append(time_torch(cfg, t))
            tokens = cfg.batch_size * cfg.seq_len
            tok_s = {name: tokens / min(w for w, _ in v) for name, v in runs.items()}
            tok_cpu_s = {name: tokens / min(c for _, c in v) for name, v in runs.items()}
            best_torch = max(tok_s[f"torch{t}"] for t in torch_threads)
            results.append({"size": size, "attention": cfg.attention, "k": cfg.k if row != "dense" else None,
                            "d_model": cfg.d_model, "heads": cfg.heads, "seq_len": cfg.seq_len,
                            "batch_size": cfg.batch_size, "timed_steps": steps - 1, "rounds": args.rounds,
                            "seconds_per_step": runs, "tokens_per_s": tok_s,
                            "tokens_per_cpu_s": tok_cpu_s,
                            "ratio_vs_best_torch": tok_s["topkattn"] / best_torch, "check": err,
                            "topkattn_threads": list(USED_THREADS)})
            print(f"{size} {row}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in tok_s.items()),
                  file=sys.stderr, flush=True)
    base = ["baseline tok/s", "baseline / best torch"] if args.baseline else []
    cpu = ["per CPU-s: topkattn / torch 1T"] + (["baseline / torch 1T"] if args.baseline else [])
    head = ["size", "attention", "topkattn tok/s"] + [f"torch {t}T tok/s" for t in torch_threads] + [
        "topkattn / best torch"] + base + (cpu if 1 in torch_threads else [])
    table = []
    for r in results:
        best_torch = max(r["tokens_per_s"][f"torch{t}"] for t in torch_threads)
        row = ([r["size"], "dense" if r["k"] is None else f"top-k {r['k']}", f"{r['tokens_per_s']['topkattn']:,.0f}"]
               + [f"{r['tokens_per_s'][f'torch{t}']:,.0f}" for t in torch_threads]
               + [f"{r['ratio_vs_best_torch']:.2f}x"])
        if args.baseline:
            row += [f"{r['tokens_per_s']['baseline']:,.0f}", f"{r['tokens_per_s']['baseline'] / best_torch:.2f}x"]
        if 1 in torch_threads:  # one-thread contenders by CPU time: steadier than wall time on a shared machine
            c = r["tokens_per_cpu_s"]
            row += [f"{c['topkattn'] / c['torch1']:.2f}x"] + (
                [f"{c['baseline'] / c['torch1']:.2f}x"] if args.baseline else [])
        table.append(row)
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths)))
    from topkattn.storage import atomic_write_json

    os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
    atomic_write_json(args.json_path, {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "topkattn_blas_threads": blas, "baseline": args.baseline,
        "torch_version": torch.__version__, "numpy_version": np.__version__,
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "rows": results}, prefix=".bench-")


if __name__ == "__main__":
    main()
