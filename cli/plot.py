"""`topkattn plot RESULTS.json|RUN_DIR`: a PNG of a benchmark's charts or of a run's training curves.

What can be drawn:

* a train-toy run folder (or its ``history.json``): the loss per step (raw and a moving
  average) and the learning rate, titled from ``metrics.json`` when present;
* a benchmark's JSON document with a ``"plots"`` list (the benchmarks write one through
  ``benchmarks/plotting.py``): each entry a chart

      {"title": str, "xlabel": str, "ylabel": str, "xscale": "linear"|"log", "yscale": "linear"|"log",
       "kind": "line"|"bar",
       "series": [{"label": str, "x": [number or str], "y": [number or null], "alpha": float (optional)}]}

  (null y values are gaps; "bar" draws grouped bars over the categories of the first series'
  x).  :func:`check_charts` validates a list of charts and :func:`draw_charts` draws them
  into one PNG (one panel each, two per row); the benchmarks use both, so a PNG they write
  and the one this command redraws from their JSON are the same.

matplotlib is optional (``pip install 'topkattn[plot]'``); it is imported only to draw.
"""
import io
import json
import math
import numbers
import os

import click

from topkattn.cli.common import command, fail

SCALES = ("linear", "log")
KINDS = ("line", "bar")
MAX_MAGNITUDE = 1e300  # the largest |x| or |y| drawn: matplotlib's axis limits overflow near float64's maximum
MATPLOTLIB_MISSING = "plotting needs matplotlib: pip install 'topkattn[plot]'"


class ChartError(ValueError):
    """A chart list that cannot be drawn (the message names the chart and the field)."""


def check_charts(charts):
    """``charts`` as a list of well-formed chart dicts (see the module docstring); ChartError otherwise."""
    if not isinstance(charts, list) or not charts:
        raise ChartError("'plots' must be a non-empty list of charts")
    for i, c in enumerate(charts):
        where = f"plots[{i}]"
        if not isinstance(c, dict):
            raise ChartError(f"{where} must be an object, got {type(c).__name__}")
        for key in ("xscale", "yscale"):
            if c.get(key, "linear") not in SCALES:
                raise ChartError(f"{where}.{key} must be 'linear' or 'log', got {c.get(key)!r}")
        if c.get("kind", "line") not in KINDS:
            raise ChartError(f"{where}.kind must be 'line' or 'bar', got {c.get('kind')!r}")
        if c.get("kind", "line") == "bar" and c.get("xscale", "linear") != "linear":
            raise ChartError(f"{where}: a bar chart's x axis holds categories, its xscale must be 'linear'")
        series = c.get("series")
        if not isinstance(series, list) or not series:
            raise ChartError(f"{where}.series must be a non-empty list")
        for j, s in enumerate(series):
            w = f"{where}.series[{j}]"
            if not isinstance(s, dict) or not isinstance(s.get("x"), list) or not isinstance(s.get("y"), list):
                raise ChartError(f"{w} must be an object with lists 'x' and 'y'")
            if len(s["x"]) != len(s["y"]):
                raise ChartError(f"{w}: x has {len(s['x'])} values, y {len(s['y'])}")
            alpha = s.get("alpha")
            if alpha is not None and not (_is_number(alpha) and 0 <= alpha <= 1):
                raise ChartError(f"{w}.alpha must be a number in [0, 1], got {_brief(alpha)}")
            for i, v in enumerate(s["x"]):
                if not (v is None or isinstance(v, str) or _drawable(v)):
                    raise ChartError(f"{w}.x must hold numbers (of magnitude at most {MAX_MAGNITUDE:g}) or strings: "
                                     f"x[{i}] is {_brief(v)}")
            for i, v in enumerate(s["y"]):
                if not (v is None or _drawable(v)):
                    raise ChartError(f"{w}.y must hold numbers (null for a gap) of magnitude at most "
                                     f"{MAX_MAGNITUDE:g}: y[{i}] is {_brief(v)}")
    return charts


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _drawable(v):
    """Whether ``v`` is a number matplotlib can place on an axis: NaN and the infinities (not
    drawn) or a magnitude at most MAX_MAGNITUDE (its limits and ticks overflow beyond)."""
    if not _is_number(v):
        return False
    try:
        v = float(v)
    except OverflowError:  # an integer beyond float64
        return False
    return not math.isfinite(v) or abs(v) <= MAX_MAGNITUDE


def _brief(v):
    """``v`` as JSON for a message, cut to 40 characters."""
    if isinstance(v, int) and abs(v) >= 10**40:
        return f"an integer of {len(str(abs(v)))} digits"
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):  # charts built in Python may hold any object
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def draw_charts(charts, path, *, title=None):
    """Draw ``charts`` (validated by :func:`check_charts`) into the PNG ``path``, written atomically.

    ImportError (naming the ``plot`` extra) without matplotlib.
    """
    check_charts(charts)
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MATPLOTLIB_MISSING) from e
    from topkattn.storage import atomic_write

    cols = 1 if len(charts) == 1 else 2
    rows = math.ceil(len(charts) / cols)
    fig = Figure(figsize=(6 * cols, 4.2 * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, charts):
        # scales first: setting one after plotting would reset a categorical axis's labels
        ax.set(xscale=c.get("xscale", "linear"), yscale=c.get("yscale", "linear"))
        if c.get("kind", "line") == "bar":
            _bars(ax, c["series"])
        for s in c["series"] if c.get("kind", "line") == "line" else ():
            y = [math.nan if v is None else v for v in s["y"]]
            ax.plot(s["x"], y, marker="o" if len(y) <= 40 else None, markersize=4, alpha=s.get("alpha", 1.0),
                    label=s.get("label"))
        ax.set(title=c.get("title", ""), xlabel=c.get("xlabel", ""), ylabel=c.get("ylabel", ""))
        if any(isinstance(v, str) for s in c["series"] for v in s["x"]):
            ax.tick_params(axis="x", labelrotation=20)
        ax.grid(True, alpha=0.3)
        if any(s.get("label") for s in c["series"]):
            ax.legend(fontsize="small")
    for ax in axes[len(charts):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(os.fspath(path), lambda f: f.write(buf.getvalue()), prefix=".plot-")


def _bars(ax, series):
    """Grouped bars: one group per category (the first series' x), one bar per series."""
    cats = [str(v) for v in series[0]["x"]]
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        y = dict(zip((str(v) for v in s["x"]), s["y"]))
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(cats))],
               [math.nan if y.get(cat) is None else y[cat] for cat in cats], width, label=s.get("label"))
    ax.set_xticks(range(len(cats)), cats)


def history_charts(history, metrics=None):
    """The charts of a run's ``history.json`` ({"loss": [...], "lr": [...]}) and the figure title
    from its ``metrics.json``: ``(charts, title)``."""
    loss, lr = history.get("loss"), history.get("lr")
    if not isinstance(loss, list) or not loss:
        raise ChartError("history has no per-step 'loss' list")
    for key, values in (("loss", loss), ("lr", lr if isinstance(lr, list) else [])):
        for i, v in enumerate(values):  # named here: the charts' own names are not in the file
            if not _drawable(v):
                raise ChartError(f"history '{key}' must hold numbers of magnitude at most {MAX_MAGNITUDE:g}: "
                                 f"{key}[{i}] is {_brief(v)}")
    steps = list(range(1, len(loss) + 1))
    w = max(1, len(loss) // 50)
    avg = [sum(loss[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(loss))]
    wide = min(loss) > 0 and max(loss) / min(loss) > 10  # a log axis only when the loss spans a decade
    series = [{"label": "per step", "x": steps, "y": loss, "alpha": 0.35 if w > 1 else 1.0}]
    if w > 1:
        series.append({"label": f"mean of {w} steps", "x": steps, "y": avg})
    charts = [{"title": "training loss", "xlabel": "step", "ylabel": "loss (nats per scored token)",
               "yscale": "log" if wide else "linear", "series": series}]
    if isinstance(lr, list) and len(lr) == len(loss):
        charts.append({"title": "learning rate", "xlabel": "step", "ylabel": "learning rate",
                       "series": [{"label": None, "x": steps, "y": lr}]})
    title = None
    if isinstance(metrics, dict) and metrics:  # numbers that are not numbers are left out of the title
        parts = [str(metrics.get("task", "")), str(metrics.get("attention", ""))]
        if metrics.get("k") is not None:
            parts.append(f"k={metrics['k']}")
        if _drawable(metrics.get("forget_rate")) and metrics["forget_rate"]:
            parts.append(f"forget={metrics['forget_rate']:g}")
        if _drawable(metrics.get("accuracy")):
            parts.append(f"held-out accuracy {metrics['accuracy']:.4f}")
        elif _drawable(metrics.get("bits_per_char")):
            parts.append(f"held-out {metrics['bits_per_char']:.3f} bits/char")
        title = " ".join(p for p in parts if p)
    return charts, title


def _read_json(path):
    from topkattn.storage import read_json

    try:
        return read_json(path)
    except ValueError as e:
        fail(str(e))


@command("plot")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write [default: RUN_DIR/loss.png for a run, RESULTS.png beside RESULTS.json].")
@click.option("--force", is_flag=True, help="Replace an existing PNG named by -o.")
def plot(source, out, force):
    """Draw a benchmark's results (RESULTS.json with a "plots" list) or a run's loss and learning-rate
    curves (RUN_DIR or its history.json) into a PNG.

    \b
    Example:  topkattn plot run/                         (writes run/loss.png)
              topkattn plot run/ -o loss.png
              topkattn plot forgetful.json -o forgetful.png

    Needs matplotlib (pip install 'topkattn[plot]').  A file named by -o that exists is kept
    unless --force; the default PNG is redrawn.
    """
    if out == "":
        raise click.UsageError("-o/--out must name a file, got ''")
    title = None
    if os.path.isdir(source):
        src = os.path.join(source, "history.json")
        if not os.path.exists(src):
            raise click.UsageError(f"{source} has no history.json (RUN_DIR must be a train-toy --out folder)")
        default_out = os.path.join(source, "loss.png")
    else:
        src, default_out = source, os.path.splitext(source)[0] + ".png"
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    metrics_path = os.path.join(folder, "metrics.json")  # a run's, for the title
    named, out = out is not None, out or default_out
    if os.path.realpath(out) in (os.path.realpath(src), os.path.realpath(metrics_path)):
        raise click.UsageError(f"-o {out!r} is a file the plot is drawn from; name another PNG")
    if named and os.path.exists(out) and not force:  # the default PNG is this command's own: redrawn
        raise click.UsageError(f"{out!r} exists; pass --force to replace it")
    doc = _read_json(src)
    try:
        if isinstance(doc, dict) and "plots" in doc:
            charts, title = check_charts(doc["plots"]), doc.get("title")
        elif isinstance(doc, dict) and "loss" in doc:
            charts, title = history_charts(doc, _read_json(metrics_path) if os.path.exists(metrics_path) else None)
        else:
            fail(f"{source} holds neither a 'plots' list (a benchmark's JSON) nor a run's history "
                 f"('loss' per step)")
        draw_charts(charts, out, title=title)
    except ChartError as e:
        fail(f"{source}: {e}")
    except ImportError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    click.echo(f"wrote {out}")
