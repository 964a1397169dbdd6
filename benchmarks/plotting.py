"""Charts for the benchmarks: built as JSON-able specs, stored in the results document, drawn to PNG.

A benchmark builds its charts with :func:`chart` and :func:`series`, puts them in its JSON
document under ``"plots"`` (so ``topkattn plot RESULTS.json`` redraws them later) and writes
the PNG with :func:`save_png`.  Drawing is :func:`topkattn.cli.plot.draw_charts` (matplotlib,
optional: without it :func:`save_png` prints one line and skips the PNG)::

    import plotting  # benchmarks/ is the script's folder, so this resolves when run as a script
    charts = [plotting.chart("recall vs context", "context length", "recall",
                             [plotting.series("refit x2", xs, ys)], xscale="log")]
    doc["plots"] = charts
    atomic_write_json(json_path, doc, prefix=".bench-")
    plotting.save_png(charts, plotting.png_path(args.png, json_path), title="...")

``png_path(png, json_path)``: the ``--png`` option if given, else the JSON path with ``.png``
(no PNG when neither is given).
"""
import math
import os
import sys


def series(label, x, y, *, alpha=None):
    """One line of a chart: ``x`` and ``y`` of equal length (y None or NaN: a gap)."""
    x, y = list(x), [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"series {label!r}: x has {len(x)} values, y {len(y)}")
    s = {"label": label, "x": [v if isinstance(v, str) else float(v) for v in x], "y": y}
    if alpha is not None:
        s["alpha"] = float(alpha)
    return s


def chart(title, xlabel, ylabel, lines, *, xscale="linear", yscale="linear", kind="line"):
    """A chart spec (see :mod:`topkattn.cli.plot`) with the series ``lines``; ``kind="bar"``:
    grouped bars over categories (the x values, e.g. method names)."""
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "xscale": xscale, "yscale": yscale, "kind": kind,
            "series": list(lines)}


def png_path(png, json_path):
    """Where to write the PNG: ``png`` if given, else ``json_path`` with ``.png``, else None."""
    if png:
        return png
    if json_path:
        return os.path.splitext(json_path)[0] + ".png"
    return None


def save_png(charts, path, *, title=None, file=sys.stderr):
    """Draw ``charts`` into the PNG ``path`` (atomically); True if written.

    Without matplotlib: one line on ``file`` and False.  ``path`` None: nothing, False.
    """
    if path is None:
        return False
    from topkattn.cli.plot import draw_charts

    try:
        draw_charts(charts, path, title=title)
    except ImportError:
        print(f"no PNG: matplotlib is not installed (pip install 'topkattn[plot]'); skipped {path}", file=file)
        return False
    print(f"wrote {path}", file=file)
    return True
