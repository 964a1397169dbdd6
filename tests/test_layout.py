"""The package's import direction, read from the source with ``ast`` (imports inside functions too).

Lowest first:  backend, threads, checks  ->  ops (+ cuda)  ->  layers  ->  model  ->
{decoding, training}  ->  distributed  ->  cli.  Beside ops: ann and storage (on backend/threads/checks and
storage only).  Beside the layers: interop and pretrained (on ops and layers; pretrained reads its
files through storage).  testing (the
tests' helpers) on checks and backend only, and nothing in the library imports it.
A "unit" is a module of the package root or a subpackage; ``cli/`` is installed as topkattn.cli.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "topkattn"
CLI = ROOT / "cli"

BASE = {"backend", "threads", "checks"}
BELOW_LAYERS = BASE | {"ops", "cuda", "ann", "storage"}
ALLOWED = {  # unit -> the other units it may import
    "backend": BASE, "threads": BASE, "checks": BASE,
    "storage": BASE,
    "ann": BASE | {"storage"},
    "ops": BASE | {"cuda"},
    "cuda": BASE | {"ops"},
    "testing": {"backend", "checks"},
    "layers": BELOW_LAYERS,
    "model": BELOW_LAYERS | {"layers"},
    "interop": BASE | {"ops", "cuda", "layers"},
    "pretrained": BASE | {"ops", "cuda", "layers", "storage"},
    "decoding": BELOW_LAYERS | {"layers", "model"},
    "training": BELOW_LAYERS | {"layers", "model"},
    "distributed": BELOW_LAYERS | {"layers", "model", "decoding", "training"},  # MPI on top of the rest
    "train": {"training"},  # the compatibility name for topkattn.training.train
    "__init__": {"ops"},
}
ALLOWED["cli"] = set(ALLOWED) - {"testing"}
ROOT_MODULES = {"__init__", "backend", "threads", "checks", "storage", "model", "testing", "train"}
SUBPACKAGES = {"ann", "cuda", "decoding", "distributed", "interop", "layers", "ops", "pretrained", "training"}


def _sources():
    """(path, unit, dotted package of the file) for every module of topkattn/ and cli/."""
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        yield path, unit, ".".join(("topkattn",) + rel.parts[:-1])
    for path in sorted(CLI.rglob("*.py")):
        yield path, "cli", ".".join(("topkattn", "cli") + path.relative_to(CLI).parts[:-1])


def _imported(tree, package):
    """(line, dotted name) of every import anywhere in ``tree``, relative ones resolved; for
    ``from X import name`` both X and X.name (name may be a submodule); string arguments of
    importlib.import_module / __import__ too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def _unit_of(name):
    """The package unit a dotted name belongs to (None outside topkattn); topkattn.cli -> cli."""
    parts = name.split(".")
    if parts[0] != "topkattn":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in ALLOWED else None  # topkattn.<attribute>, not a unit


def _edges():
    """(file, line, importing unit, imported name, imported unit) for every import of the package."""
    for path, unit, package in _sources():
        first = {}  # (line, unit) -> the first name: `from X import y` names X and X.y
        for line, name in _imported(ast.parse(path.read_text(), str(path)), package):
            target = _unit_of(name)
            if target is not None and target != unit:
                first.setdefault((line, target), name)
        for (line, target), name in sorted(first.items()):
            yield path.relative_to(ROOT), line, unit, name, target


def test_every_import_follows_the_layers():
    bad = [f"{path}:{line}: {unit} imports {name} ({unit} may import {sorted(ALLOWED[unit])})"
           for path, line, unit, name, target in _edges() if target not in ALLOWED[unit]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("importers,forbidden", [
    ({"ops", "layers"}, {"decoding", "training", "train"}),
    ({"decoding"}, {"training", "train"}),
    ({"ops"}, {"layers", "model"}),
    (set(ALLOWED) - {"cli"}, {"cli"}),
    (set(ALLOWED) - {"testing"}, {"testing"}),
], ids=["ops+layers-not-decoding/training", "decoding-not-training", "ops-not-layers/model",
        "library-not-cli", "nothing-imports-testing"])
def test_forbidden_directions(importers, forbidden):
    """The rules the issue names, spelled out so that loosening ALLOWED cannot drop them."""
    assert not forbidden & set().union(*(ALLOWED[u] for u in importers))
    bad = [f"{path}:{line}: {name}" for path, line, unit, name, target in _edges()
           if unit in importers and target in forbidden]
    assert not bad, f"{sorted(importers)} must not import {sorted(forbidden)}:\n" + "\n".join(bad)


def test_package_root_holds_the_target_layout():
    assert {p.stem for p in PKG.glob("*.py")} == ROOT_MODULES
    assert {p.parent.name for p in PKG.glob("*/__init__.py")} == SUBPACKAGES
    assert set(ALLOWED) == ROOT_MODULES | SUBPACKAGES | {"cli"}  # every unit has its place
