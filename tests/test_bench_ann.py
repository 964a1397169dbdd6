"""benchmarks/bench_ann.py's equal-recall comparison: the step pick and the frontier reading."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # its own imports (bench_args)
_spec = importlib.util.spec_from_file_location("bench_ann", ROOT / "benchmarks" / "bench_ann.py")
bench_ann = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ann)


def _row(method, c, r, recall, qps):
    return dict(method=method, clusters=c, rerank=r, recall=recall, qps=qps, q_per_cpu_s=qps / 2)


def test_pareto_front_drops_dominated_settings():
    pts = [(0.80, 100.0), (0.85, 120.0), (0.90, 60.0), (0.90, 50.0), (0.95, 30.0), (0.70, 90.0)]
    assert bench_ann.pareto_front(pts) == [(0.85, 120.0), (0.90, 60.0), (0.95, 30.0)]


def test_equal_recall_steps_and_interpolates_on_the_frontier():
    rows = [_row("topkattn", 8, 50, 0.80, 200.0), _row("topkattn", 8, 100, 0.90, 100.0),
            _row("topkattn", 16, 100, 0.95, 50.0),
            _row("lorann", 8, 50, 0.85, 150.0), _row("lorann", 8, 100, 0.90, 100.0),
            _row("lorann", 16, 100, 0.97, 40.0), _row("lorann", 4, 0, 0.50, 400.0)]
    got = {e["reference"]: e for e in bench_ann.equal_recall(rows)}
    mid = got[(8, 50)]  # halfway between 200 and 100 q/s in log space: sqrt(200 * 100)
    assert mid["ours"] == (8, 100) and mid["qps_ratio"] == pytest.approx(100 / 150)
    assert mid["interp_qps_ratio"] == pytest.approx((200 * 100) ** 0.5 / 150)
    same = got[(8, 100)]  # a frontier point at exactly the reference's recall
    assert same["qps_ratio"] == pytest.approx(1.0) and same["interp_qps_ratio"] == pytest.approx(1.0)
    above = got[(16, 100)]  # beyond our best recall: neither reading
    assert above["ours"] is None and above["interp_qps_ratio"] is None
    below = got[(4, 0)]  # below our lowest recall: the step pick only
    assert below["ours"] == (8, 50) and below["interp_qps_ratio"] is None
