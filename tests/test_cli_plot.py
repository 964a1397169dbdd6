"""`topkattn plot`: a run's loss/learning-rate curves and a benchmark's charts as valid PNGs,
the history charts' numbers, one-line errors, and the benchmarks' shared helper
(benchmarks/plotting.py) skipping the PNG with one line when matplotlib is missing."""
import importlib.util
import io
import json
import os
import struct
import sys
import zlib

import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.cli.plot import ChartError, check_charts, history_charts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (the plot extra) is not installed")


def png_size(path):
    """(width, height) of a PNG, checking the signature and the IHDR chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + 13]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(main, ["train-toy", "--layers", "1", "--d-model", "16", "--heads", "2", "--steps", "5",
                                  "--seq-len", "16", "--num-kv-pairs", "2", "--vocab-size", "16", "--batch-size",
                                  "4", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return str(out)


def _plot(*args):
    return CliRunner().invoke(main, ["plot", *args])


@needs_matplotlib
def test_run_curves_png(run, tmp_path):
    r = _plot(run)
    assert r.exit_code == 0, r.output
    default = os.path.join(run, "loss.png")
    assert r.stdout.strip() == f"wrote {default}"
    w, h = png_size(default)
    assert w > 500 and h > 300 and os.path.getsize(default) > 5000
    out = tmp_path / "curve.png"
    r = _plot(os.path.join(run, "history.json"), "-o", str(out))  # the history file itself
    assert r.exit_code == 0 and png_size(out) == (w, h)


def test_history_charts_numbers():
    loss = [float(v) for v in range(100, 0, -1)]  # 100 steps: a mean over 2 steps
    charts, title = history_charts({"loss": loss, "lr": [0.1] * 100},
                                   {"task": "mqar", "attention": "topk", "k": 8, "forget_rate": 0.1,
                                    "accuracy": 0.5})
    check_charts(charts)
    raw, avg = charts[0]["series"]
    assert raw["x"] == list(range(1, 101)) and raw["y"] == loss
    assert avg["label"] == "mean of 2 steps" and avg["y"][0] == 100.0 and avg["y"][1] == 99.5 and avg["y"][-1] == 1.5
    assert charts[0]["yscale"] == "log"  # 100 to 1: two decades
    assert charts[1]["series"][0]["y"] == [0.1] * 100
    assert title == "mqar topk k=8 forget=0.1 held-out accuracy 0.5000"
    charts, _ = history_charts({"loss": [2.0, 1.5, 1.2]})
    _, title = history_charts({"loss": [1.0]}, {"task": "mqar", "forget_rate": "x", "accuracy": 10**400})
    assert title == "mqar"  # a metrics.json whose numbers are not numbers: left out of the title
    assert history_charts({"loss": [1.0]}, [1, 2])[1] is None
    assert len(charts) == 1 and len(charts[0]["series"]) == 1 and charts[0]["yscale"] == "linear"


def _bench_doc(n):
    return {"title": "a benchmark",
            "plots": [{"title": f"chart {i}", "xlabel": "T", "ylabel": "ms", "xscale": "log", "yscale": "log",
                       "series": [{"label": "topk", "x": [1024, 4096, 16384], "y": [1.0, 3.5, None]},
                                  {"label": "dense", "x": [1024, 4096, 16384], "y": [2.0, 30.0, 480.0]}]}
                      for i in range(n)]}


@needs_matplotlib
def test_benchmark_json_png(tmp_path):
    sizes = {}
    for n in (1, 3):
        src = tmp_path / f"bench{n}.json"
        src.write_text(json.dumps(_bench_doc(n)))
        r = _plot(str(src))
        assert r.exit_code == 0, r.output
        sizes[n] = png_size(tmp_path / f"bench{n}.png")  # default: beside the JSON
    assert sizes[3][0] > sizes[1][0] and sizes[3][1] > sizes[1][1]  # 2 columns x 2 rows of panels
    names = ["exact", "lorann"]
    cat = {"plots": [{"title": "per setting", "series": [{"label": "a", "x": names, "y": [1, 0.9]}]},
                     {"title": "bars", "kind": "bar", "series": [{"label": "a", "x": names, "y": [1, 0.9]},
                                                                 {"label": "b", "x": names, "y": [1, None]}]}]}
    (tmp_path / "cat.json").write_text(json.dumps(cat))
    assert _plot(str(tmp_path / "cat.json"), "-o", str(tmp_path / "c.png")).exit_code == 0
    assert png_size(tmp_path / "c.png")[0] > 0


@pytest.mark.parametrize("doc,msg", [
    ({"rows": [1, 2]}, "neither a 'plots' list"),
    ({"plots": []}, "non-empty list"),
    ({"plots": [{"series": [{"x": [1, 2], "y": [1]}]}]}, "plots[0].series[0]: x has 2 values, y 1"),
    ({"plots": [{"series": [{"x": [1], "y": ["a"]}]}]}, "plots[0].series[0].y must hold numbers"),
    ({"plots": [{"xscale": "cubic", "series": [{"x": [1], "y": [1]}]}]}, "plots[0].xscale"),
    ({"plots": [{"kind": "pie", "series": [{"x": [1], "y": [1]}]}]}, "plots[0].kind must be 'line' or 'bar'"),
    ({"loss": []}, "no per-step 'loss' list"),
    ({"plots": [{"series": [{"x": [1], "y": [1], "alpha": 5}]}]}, "series[0].alpha must be a number in [0, 1]"),
    ({"plots": [{"series": [{"x": [1], "y": [1], "alpha": "x"}]}]}, "alpha must be a number in [0, 1], got \"x\""),
    ({"plots": [{"series": [{"x": [{}, 2], "y": [1, 2]}]}]}, "plots[0].series[0].x must hold numbers"),
    ({"plots": [{"series": [{"x": [1, 2], "y": [1e308, -1e308]}]}]}, "y[0] is 1e+308"),
    ({"plots": [{"series": [{"x": [1, 2], "y": [1, 10**400]}]}]}, "y[1] is an integer of 401 digits"),
    ({"plots": [{"kind": "bar", "xscale": "log", "series": [{"x": ["a"], "y": [1]}]}]}, "xscale must be 'linear'"),
    ({"loss": [1e308, 1e308]}, "history 'loss' must hold numbers of magnitude at most 1e+300: loss[0] is 1e+308"),
    ({"loss": [True, 2.0]}, "history 'loss' must hold numbers of magnitude at most 1e+300: loss[0] is true"),
    ({"loss": [1.0, 2.0], "lr": [0.1, "x"]}, "history 'lr' must hold numbers"),
])
def test_bad_documents_fail_in_one_line(tmp_path, doc, msg):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc))
    r = _plot(str(src))
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1 and msg in r.output
    assert not (tmp_path / "r.png").exists()


def test_usage_errors_and_unreadable_json(tmp_path):
    r = _plot(str(tmp_path / "missing.json"))
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "does not exist" in r.output
    r = _plot(str(tmp_path))  # a folder that is not a run
    assert r.exit_code == 2 and "no history.json" in r.output and r.output.count("\n") == 1
    (tmp_path / "x.json").write_text("{not json")
    r = _plot(str(tmp_path / "x.json"))
    assert r.exit_code == 1 and "cannot read" in r.output and r.output.count("\n") == 1
    r = _plot()
    assert r.exit_code == 2 and "Missing argument" in r.output and r.output.count("\n") == 1
    h = _plot("--help")
    assert h.exit_code == 0 and "history.json" in h.output and "-o, --out" in h.output


@needs_matplotlib
def test_an_existing_png_is_kept_unless_forced(run, tmp_path):
    def refused(r):
        return r.exit_code == 2 and r.output.startswith("Error: ") and r.output.count("\n") == 1
    out = tmp_path / "mine.png"
    out.write_bytes(b"keep me")
    r = _plot(run, "-o", str(out))
    assert refused(r) and "--force" in r.output and out.read_bytes() == b"keep me"
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_bench_doc(1)))
    (tmp_path / "bench.png").write_bytes(b"an earlier drawing")  # the default output beside the JSON
    r = _plot(str(src))  # the default PNG is this command's (and the benchmark's) own: redrawn
    assert r.exit_code == 0, r.output
    assert png_size(tmp_path / "bench.png")[0] > 0
    r = _plot(str(src), "-o", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert png_size(out)[0] > 0
    r = _plot(str(src), "-o", str(src), "--force")  # never the file it draws, even forced
    assert refused(r) and "drawn from" in r.output and json.loads(src.read_text()) == _bench_doc(1)
    r = _plot(run, "-o", "")
    assert refused(r) and "-o/--out" in r.output


def test_missing_matplotlib_is_one_line(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = _plot(run, "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "pip install 'topkattn[plot]'" in r.output
    assert not (tmp_path / "x.png").exists()


def _bench_plotting():
    spec = importlib.util.spec_from_file_location("bench_plotting", os.path.join(ROOT, "benchmarks", "plotting.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_helper_builds_charts_and_skips_without_matplotlib(tmp_path, monkeypatch):
    plotting = _bench_plotting()
    s = plotting.series("exact", [1, 2, 4], [0.5, float("nan"), 1])
    assert s == {"label": "exact", "x": [1.0, 2.0, 4.0], "y": [0.5, None, 1.0]}
    charts = [plotting.chart("t", "x", "y", [s], xscale="log")]
    assert check_charts(charts) == charts
    with pytest.raises(ValueError):
        plotting.series("bad", [1, 2], [1])
    assert plotting.png_path(None, "out/r.json") == os.path.join("out", "r.png")
    assert plotting.png_path("p.png", "r.json") == "p.png" and plotting.png_path(None, None) is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    err = io.StringIO()
    assert plotting.save_png(charts, str(tmp_path / "b.png"), file=err) is False
    assert err.getvalue().count("\n") == 1 and "matplotlib is not installed" in err.getvalue()
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(ChartError):
        check_charts([{"series": []}])


@needs_matplotlib
def test_benchmark_helper_writes_the_png_the_cli_redraws(tmp_path):
    plotting = _bench_plotting()
    charts = _bench_doc(2)["plots"]
    err = io.StringIO()
    assert plotting.save_png(charts, str(tmp_path / "b.png"), file=err) is True
    (tmp_path / "doc.json").write_text(json.dumps({"plots": charts}))
    assert _plot(str(tmp_path / "doc.json"), "-o", str(tmp_path / "cli.png")).exit_code == 0
    assert png_size(tmp_path / "b.png") == png_size(tmp_path / "cli.png")
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
