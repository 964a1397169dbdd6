"""benchmarks/bench_quality_seeds.py: the per-seed pairing with the baseline and the statistics."""
import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # its own imports (bench_quality, plotting)
_spec = importlib.util.spec_from_file_location("bench_quality_seeds", ROOT / "benchmarks" / "bench_quality_seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)


def _row(variant, task, seed, value):
    key = "accuracy" if task.startswith("mqar") else "bits_per_char"
    return {"variant": variant, "task": task, "seed": seed, key: value}


def test_gaps_pair_rows_of_the_same_seed_and_task():
    rows = [_row("dense", "text-long", 0, 2.80), _row("dense", "text-long", 1, 2.70),
            _row("topk-k32", "text-long", 1, 2.75), _row("topk-k32", "text-long", 0, 2.83),
            _row("topk-k32", "text-long", 2, 9.99),  # no dense row at seed 2: not in the gap
            _row("dense", "mqar", 0, 0.90), _row("topk-k32", "mqar", 0, 0.80)]
    got = {(e["variant"], e["task"]): e for e in seeds.seed_summary(rows)}
    k32 = got[("topk-k32", "text-long")]
    assert k32["seeds"] == [0, 1, 2] and k32["gap_seeds"] == [0, 1]
    assert k32["gaps"] == pytest.approx([0.03, 0.05])
    g = k32["gap"]
    assert g["n"] == 2 and g["mean"] == pytest.approx(0.04)
    assert g["sd"] == pytest.approx(math.sqrt(2) * 0.01)  # sample sd of 0.03, 0.05
    assert g["stderr"] == pytest.approx(0.01)
    assert (g["min"], g["max"]) == pytest.approx((0.03, 0.05))
    assert k32["mean"] == pytest.approx((2.83 + 2.75 + 9.99) / 3)
    assert got[("topk-k32", "mqar")]["metric"] == "accuracy"
    assert got[("topk-k32", "mqar")]["gaps"] == pytest.approx([-0.10])
    assert "gap" not in got[("dense", "text-long")]
    assert got[("dense", "text-long")]["sd"] == pytest.approx(math.sqrt(0.005))


def test_one_seed_has_zero_spread_and_a_missing_baseline_no_gap():
    rows = [_row("dense", "text", 3, 2.5), _row("tail-k32", "text", 3, 2.6), _row("block-16x2", "text", 4, 2.4)]
    got = {e["variant"]: e for e in seeds.seed_summary(rows)}
    assert got["tail-k32"]["gap"]["sd"] == 0.0 and got["tail-k32"]["gap"]["mean"] == pytest.approx(0.1)
    assert got["block-16x2"]["gap"] is None and got["block-16x2"]["gaps"] == []
    assert "-" in seeds.fmt_summary(seeds.seed_summary(rows)).splitlines()[-1]


@pytest.mark.parametrize("argv", [["--seeds", "1", "1"], ["--seeds", "-1"], ["--jobs", "0"],
                                  ["--variants", "nope"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        seeds.parse_args(argv)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_merge_keeps_the_rows_not_trained_now_and_refuses_another_budget(tmp_path):
    import json

    path = tmp_path / "q.json"
    a = seeds.parse_args(["--seeds", "2", "--variants", "dense", "--json", str(path), "--merge"])
    budget = lambda seed, **kw: seeds.bench_quality.row_budget(  # noqa: E731
        "text-long", argparse.Namespace(**{**vars(a), "seed": seed, **kw}))
    old = [{**_row("dense", "text-long", 0, 2.8), "budget": budget(0)},
           {**_row("dense", "text-long", 2, 9.9), "budget": budget(2)},   # trained again now: replaced
           {**_row("topk-k32", "text-long", 0, 2.9), "budget": budget(0)}]
    path.write_text(json.dumps({"args": {}, "rows": old}))
    jobs = [("dense", "text-long", 2, a)]
    assert seeds.previous_rows(a, jobs) == [old[0], old[2]]
    old[2]["budget"] = budget(0, text_long_steps=a.text_long_steps + 1)
    path.write_text(json.dumps({"args": {}, "rows": old}))
    with pytest.raises(SystemExit, match="trained with another budget: topk-k32/text-long/seed 0"):
        seeds.previous_rows(a, jobs)
    with pytest.raises(SystemExit, match="--merge needs an existing --json file"):
        seeds.previous_rows(seeds.parse_args(["--json", str(tmp_path / "none.json"), "--merge"]), jobs)
