"""bench_quality's rows over several seeds: each variant's gap to dense at the same seed and budget.

One seed cannot tell a 0.02 bits/char gap from noise: at text length 512 and 400 steps, token
top-k k=32's gap to dense ranged over several hundredths from one seed to the next.  This trains
every (variant, task, seed) of bench_quality (its variants, tasks and budgets, unchanged), pairs
each row with the baseline variant's row of the same task and seed, and reports per variant and
task the metric and the gap (variant - baseline; bits/char: lower is better, MQAR accuracy:
higher) as mean, sample standard deviation, standard error, min and max over the seeds.

    python benchmarks/bench_quality_seeds.py                     # text-long, 5 seeds, 2 jobs
    python benchmarks/bench_quality_seeds.py --tasks text --seeds 0 1 2 --variants dense topk-k8

The committed results (ten seeds of dense and k = 32; tail-k32 and hybrid-k32-d0 over the first five):

    python benchmarks/bench_quality_seeds.py --text-long-steps 400
    python benchmarks/bench_quality_seeds.py --text-long-steps 400 --variants dense topk-k32 --seeds 5 6 7 8 9 --merge
    python benchmarks/bench_quality_seeds.py --text-long-steps 1000 --variants dense topk-k32 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --json benchmarks/results/quality_seeds_1000.json

Rows train in --jobs processes at once (one thread each): their tokens/s columns are then not
comparable, and this benchmark reports quality only (bench_quality.py for the costs).
Writes benchmarks/results/quality_seeds.json and a PNG of the gaps per seed.
"""
import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_quality
import plotting

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality_seeds.json")
DEFAULT_VARIANTS = ["dense", "topk-k32", "tail-k32", "hybrid-k32-d0"]


def _stats(values):
    """mean, sample sd (ddof 1; 0 for one value), standard error, min, max of a non-empty list."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "stderr": sd / math.sqrt(n), "min": min(values), "max": max(values)}


def seed_summary(rows, baseline="dense"):
    """Per (variant, task): the metric's statistics over its seeds and, for variants other than
    ``baseline``, those of the gap to the baseline's row of the same task and seed (seeds the
    baseline lacks are left out of the gap).  ``rows``: dicts with variant, task, seed and the
    task's metric (bits_per_char or accuracy)."""
    by = {(r["variant"], r["task"], r["seed"]): r for r in rows}
    keys = sorted({(r["variant"], r["task"]) for r in rows}, key=lambda vt: (vt[1], vt[0] != baseline, vt[0]))
    out = []
    for variant, task in keys:
        key = bench_quality.task_metric(task)
        seeds = sorted(s for (v, t, s) in by if (v, t) == (variant, task))
        values = [by[(variant, task, s)][key] for s in seeds]
        entry = {"variant": variant, "task": task, "metric": key, "seeds": seeds, "values": values,
                 **_stats(values)}
        if variant != baseline:
            paired = [s for s in seeds if (baseline, task, s) in by]
            gaps = [by[(variant, task, s)][key] - by[(baseline, task, s)][key] for s in paired]
            entry["gap_seeds"] = paired
            entry["gaps"] = gaps
            entry["gap"] = _stats(gaps) if gaps else None
        out.append(entry)
    return out


def fmt_summary(summary):
    head = (f"{'task':>10} {'variant':>14} {'metric':>13} {'mean':>8} {'sd':>7}   "
            f"{'gap mean':>8} {'sd':>7} {'stderr':>7} {'min':>8} {'max':>8}   gaps by seed")
    lines = [head, "-" * len(head)]
    for e in summary:
        line = f"{e['task']:>10} {e['variant']:>14} {e['metric']:>13} {e['mean']:>8.4f} {e['sd']:>7.4f}   "
        g = e.get("gap")
        if g is None:
            line += f"{'-':>8} {'-':>7} {'-':>7} {'-':>8} {'-':>8}"
        else:
            line += f"{g['mean']:>+8.4f} {g['sd']:>7.4f} {g['stderr']:>7.4f} {g['min']:>+8.4f} {g['max']:>+8.4f}   "
            line += " ".join(f"{s}:{v:+.3f}" for s, v in zip(e["gap_seeds"], e["gaps"]))
        lines.append(line)
    return "\n".join(lines)


def previous_rows(a, jobs):
    """The rows of the existing ``a.json`` to keep (--merge): those whose (variant, task, seed) is
    not trained now, each checked to have been trained with the budget this run would use for it
    (bench_quality.row_budget); exit with the stale rows listed otherwise, before any training."""
    if not a.json or not os.path.exists(a.json):
        raise SystemExit(f"--merge needs an existing --json file, got {a.json!r}")
    with open(a.json) as f:
        old = json.load(f)
    now = {(v, t, s) for v, t, s, _ in jobs}
    kept, stale = [], []
    for r in old["rows"]:
        if (r["variant"], r["task"], r["seed"]) in now or r["variant"] not in bench_quality.VARIANTS:
            continue
        want = bench_quality.row_budget(r["task"], argparse.Namespace(**{**vars(a), "seed": r["seed"]}))
        (kept if r.get("budget") == want else stale).append(r)
    if stale:
        raise SystemExit("--merge: these rows of {} were trained with another budget: {}".format(
            a.json, "; ".join(f"{r['variant']}/{r['task']}/seed {r['seed']}" for r in stale)))
    return kept


def _train(job):
    variant, task, seed, a = job
    a = argparse.Namespace(**{**vars(a), "seed": seed})
    row = bench_quality.train_row(variant, task, a)
    return {**row, "seed": seed}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(bench_quality.VARIANTS))
    ap.add_argument("--tasks", nargs="+", default=["text-long"], choices=bench_quality.TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--baseline", default="dense", choices=list(bench_quality.VARIANTS),
                    help="the variant every gap is measured against (trained too)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="rows trained at once")
    bench_quality.add_budget_args(ap)
    ap.add_argument("--json", default=RESULTS, help=f"write the rows here (default {RESULTS}; '' to skip)")
    ap.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing --json file for the (variant, task, seed) not trained now "
                         "(their budgets must match: checked) and summarise them all")
    a = ap.parse_args(argv)
    if any(s < 0 for s in a.seeds) or len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds must be distinct non-negative integers, got {a.seeds}")
    if a.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {a.jobs}")
    a.threads = 1
    return a


def main(argv=None):
    a = parse_args(argv)
    variants = [a.baseline] + [v for v in a.variants if v != a.baseline]
    jobs = [(v, t, s, a) for s in a.seeds for t in a.tasks for v in variants]
    kept = previous_rows(a, jobs) if a.merge else []
    rows = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for row in pool.map(_train, jobs):
            rows.append(row)
            key = bench_quality.task_metric(row["task"])
            print(f"seed {row['seed']} {row['task']} {row['variant']}: {key} {row[key]:.4f}", flush=True)
    report(a, kept + rows)


def report(a, rows):
    """Summarise ``rows`` (of every seed, variant and task they hold; ``a.seeds``, ``a.tasks`` and
    ``a.variants`` are set to theirs), print the table and write the JSON and the PNG."""
    rows = sorted(rows, key=lambda r: (r["seed"], r["task"], r["variant"] != a.baseline, r["variant"]))
    a.seeds = sorted({r["seed"] for r in rows})
    a.tasks = [t for t in bench_quality.TASKS if any(r["task"] == t for r in rows)]
    a.variants = [v for v in bench_quality.VARIANTS if any(r["variant"] == v for r in rows)]
    summary = seed_summary(rows, a.baseline)
    print()
    print(f"seeds {a.seeds}; each task at bench_quality's budget; gap = variant - {a.baseline} at the same seed")
    print(fmt_summary(summary))
    if a.json:
        from topkattn.storage import atomic_write_json

        charts = [plotting.chart(f"{t}: {bench_quality.task_metric(t)} gap to {a.baseline} by seed", "seed", "gap",
                                 [plotting.series(e["variant"], [f"seed {s}" for s in e["gap_seeds"]], e["gaps"])
                                  for e in summary if e["task"] == t and e.get("gaps")], kind="bar")
                  for t in a.tasks]
        doc = {"device": "cpu", "cores": os.cpu_count(), "args": vars(a),
               "rows": rows, "summary": summary, "plots": charts}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        atomic_write_json(a.json, doc, prefix=".bench-")
        print(f"wrote {a.json}")
        plotting.save_png(charts, plotting.png_path(a.png, a.json), title="quality over seeds")


if __name__ == "__main__":
    main()
