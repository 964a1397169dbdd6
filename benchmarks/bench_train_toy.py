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
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

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
    if args.forget_rate:
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
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
    args, extra = ap.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
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


if __name__ == "__main__":
    main()
