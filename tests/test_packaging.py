"""The package as pip sees it: PEP 621 metadata in pyproject.toml, an sdist that carries the
tests, examples, benchmarks and docs, and a wheel (built from that sdist, as pip does) holding
every subpackage and ``cli/`` as ``topkattn.cli``.

The builds run setuptools' PEP 517 hooks in a subprocess, without build isolation (no
network), on a copy of the source tree in a temporary folder: the working tree gets no
build/ or egg-info folders.
"""
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import topkattn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = f"topkattn-{topkattn.__version__}"
DIST_INFO = f"{NAME}.dist-info"


def _packages_on_disk():
    """Dotted names of every package folder: topkattn/** and cli/** (installed as topkattn.cli)."""
    found = set()
    for top, prefix in (("topkattn", "topkattn"), ("cli", "topkattn.cli")):
        for here, subdirs, files in os.walk(os.path.join(ROOT, top)):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(here, os.path.join(ROOT, top))
                found.add(prefix if rel == "." else prefix + "." + rel.replace(os.sep, "."))
    return found


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_folder_is_declared():
    setup = _pyproject()["tool"]["setuptools"]
    declared = set(setup["packages"])
    want = _packages_on_disk()
    assert "topkattn.decoding" in want and "topkattn.cli" in want  # the walk sees subpackages
    assert want - declared == set(), f"not in pyproject.toml packages: {sorted(want - declared)}"
    assert declared - want == set(), f"declared but not on disk: {sorted(declared - want)}"
    assert setup["package-dir"] == {"topkattn.cli": "cli"}


def test_metadata_is_pep621_with_one_version():
    doc = _pyproject()
    project = doc["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "topkattn.__version__"}
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg")), "the metadata lives in pyproject.toml alone"
    assert "ruff" in doc["tool"]  # the linter's config stays


def _source_copy(dest):
    """Copy the files git would ship (tracked, and new files not ignored) to ``dest``; outside a
    git checkout (an unpacked sdist) every file but caches and build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n and os.path.isfile(os.path.join(ROOT, n))]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:
        skip = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv*",
                                      ".pytest_cache", "runs", "results", "*.nbi", "*.nbc")
        shutil.copytree(ROOT, dest, ignore=skip)
        return
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(dest, n)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, n), os.path.join(dest, n))


def _build(hook, src, out):
    """Run ``setuptools.build_meta.<hook>(out)`` in ``src``; the built file's path."""
    code = f"import sys; from setuptools import build_meta as b; sys.stdout.write(b.{hook}({out!r}))"
    p = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return os.path.join(out, p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(sdist names, wheel names, wheel METADATA)``: the sdist built from a copy of the tree,
    the wheel built from the unpacked sdist."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools >= 77 (PEP 639 license metadata), found {setuptools.__version__}")
    tmp = tmp_path_factory.mktemp("build")
    src, dist, unpacked = tmp / "src", str(tmp / "dist"), tmp / "unpacked"
    _source_copy(src)
    sdist = _build("build_sdist", src, dist)
    with tarfile.open(sdist) as tar:
        sdist_names = [m.name for m in tar.getmembers() if m.isfile()]
        tar.extractall(unpacked, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(unpacked)
    wheel = _build("build_wheel", unpacked / NAME, dist)
    with zipfile.ZipFile(wheel) as z:
        wheel_names = z.namelist()
        meta = z.read(f"{DIST_INFO}/METADATA").decode()
        entry_points = z.read(f"{DIST_INFO}/entry_points.txt").decode()
    prefix = NAME + "/"
    assert all(n.startswith(prefix) for n in sdist_names)
    return [n[len(prefix):] for n in sdist_names], wheel_names, email.parser.Parser().parsestr(meta), entry_points


def _repo_files(folder, pattern):
    return {f"{folder}/{n}" for n in os.listdir(os.path.join(ROOT, folder)) if re.fullmatch(pattern, n)}


def test_sdist_carries_tests_examples_benchmarks_and_docs(built):
    sdist, _, _, _ = built
    names = set(sdist)
    for folder, pattern in (("examples", r".*\.py"), ("benchmarks", r".*\.py"), ("docs", r".*\.md"),
                            ("tests", r".*\.py"), ("cli", r".*\.py")):
        want = _repo_files(folder, pattern)
        assert want and want <= names, f"{folder}/ missing from the sdist: {sorted(want - names)}"
    assert {"LICENSE", "README.md", "pyproject.toml", "topkattn/py.typed"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_every_subpackage_and_cli_as_topkattn_cli(built):
    _, wheel, _, entry_points = built
    names = set(wheel)
    for pkg in _packages_on_disk():
        assert pkg.replace(".", "/") + "/__init__.py" in names, f"{pkg} is not in the wheel"
    want_cli = {f"topkattn/cli/{n}" for n in os.listdir(os.path.join(ROOT, "cli")) if n.endswith(".py")}
    assert want_cli <= names, f"cli modules missing from the wheel: {sorted(want_cli - names)}"
    want_lib = {os.path.relpath(os.path.join(here, n), ROOT).replace(os.sep, "/")
                for here, _, files in os.walk(os.path.join(ROOT, "topkattn")) for n in files if n.endswith(".py")}
    assert want_lib <= names, f"modules missing from the wheel: {sorted(want_lib - names)}"
    assert "topkattn/py.typed" in names  # PEP 561: the package ships its type hints
    top = {n.split("/")[0] for n in names}
    assert top == {"topkattn", DIST_INFO}, top  # no top-level cli/, tests/
    assert re.search(r"^topkattn = topkattn\.cli\.main:main$", entry_points, re.M)


def _requires(meta):
    """extra ('' for the base install) -> set of requirement names (lower case, no version)."""
    out = {}
    for req in meta.get_all("Requires-Dist"):
        spec, _, marker = req.partition(";")
        extra = re.search(r'extra == "([^"]+)"', marker)
        name = re.match(r"[A-Za-z0-9_.-]+(\[[^]]*\])?", spec.strip()).group(0).lower()
        out.setdefault(extra.group(1) if extra else "", set()).add(name)
    return out


def test_metadata_and_extras(built):
    _, _, meta, _ = built
    assert meta["Name"] == "topkattn" and meta["Version"] == topkattn.__version__
    assert meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"
    assert meta.get_all("Project-URL") and "Typing :: Typed" in meta.get_all("Classifier")
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "pip install -e . && topkattn train-toy" in meta.get_payload()  # the README is the description
    req = _requires(meta)
    assert {"numpy", "scipy", "numba", "click", "tqdm"} <= req[""]
    assert not {n for n in req[""] if n.startswith(("numba-cuda", "cuda-", "cupy"))}, req[""]  # a CPU install
    assert set(meta.get_all("Provides-Extra")) == {"cuda12", "cuda13", "mpi", "pretrained", "export", "plot",
                                                   "bench", "test"}  # no duplicate `cuda`
    assert req["cuda12"] == {"cupy-cuda12x", "numba-cuda[cu12]"}
    assert req["cuda13"] == {"cupy-cuda13x", "numba-cuda[cu13]"}
    assert "numba-cuda" in req["test"] and "matplotlib" in req["test"]  # the simulator tests, the plot tests
    assert req["bench"] == {"torch", "lorann", "faiss-cpu", "matplotlib"}
    assert req["plot"] == {"matplotlib"} and req["export"] == {"safetensors"}
    pins = [r for r in meta.get_all("Requires-Dist") if r.startswith("numba-cuda")]
    assert len(pins) == 3 and all("<0.31" in r for r in pins), pins
