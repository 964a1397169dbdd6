"""`mpiexec -n 2 topkattn eval RUN`: sharded decoding gives the single-process result.

Trains a tiny run with `topkattn train-toy`, then compares `topkattn eval --json` in one
process with the same command under `mpiexec -n 2` (the cache's positions stored in blocks of
64 by the two ranks: sequences of 160 give each rank candidates to search).  Skipped without
mpiexec or mpi4py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (an MPI launcher)")

CLI = [sys.executable, "-c", "from topkattn.cli.main import main; main()"]
EVAL = ["--n-sequences", "4", "--batch-size", "2", "--json", "--quiet"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
                                                             "OMPI_COMM_WORLD_RANK")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return env


def _run(args, ranks=1):
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + CLI + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = _run(["train-toy", "--task", "mqar", "--k", "3", "--layers", "2", "--d-model", "16", "--heads", "2",
              "--seq-len", "160", "--steps", "2", "--batch-size", "2", "--vocab-size", "16", "--num-kv-pairs", "3",
              "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    return str(out)


def _one_json(r):
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout  # exactly one JSON object: rank 0 speaks, the others do not
    return json.loads(lines[0])


def test_two_ranks_exact_equals_one_process(run_dir):
    one = _one_json(_run(["eval", run_dir, "--retriever", "exact", *EVAL]))
    two = _one_json(_run(["eval", run_dir, "--retriever", "exact", *EVAL], ranks=2))
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert one["n_scored"] == two["n_scored"] > 0
    # the same selections (so the same recall and k) and the same predictions; the attention is
    # merged by log-sum-exp over the ranks' keys, so the loss agrees to float32 rounding
    for key in ("accuracy", "recall", "mean_k", "k_hist", "per_layer", "recall_by_rank"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_two_ranks_dynamic_k_equals_one_process(run_dir):
    dyn = ["--k", "auto", "--tail-bound", "0.05", "--max-k", "8"]
    one = _one_json(_run(["eval", run_dir, "--retriever", "exact", *dyn, *EVAL]))
    two = _one_json(_run(["eval", run_dir, "--retriever", "exact", *dyn, *EVAL], ranks=2))
    assert two["ranks"] == 2 and two["k"] == "auto"
    for key in ("accuracy", "mean_k", "k_hist", "certified_fraction", "k_quantiles", "recall"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_two_ranks_lorann_at_full_search_equals_exact(run_dir):
    one = _one_json(_run(["eval", run_dir, "--retriever", "exact", *EVAL]))
    full = ["--clusters-to-search", "1.0", "--rerank", "1000"]
    two = _one_json(_run(["eval", run_dir, "--retriever", "lorann", *full, *EVAL], ranks=2))
    assert two["retriever"] == "lorann" and two["ranks"] == 2
    assert two["accuracy"] == one["accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["recall"] == 1.0


def test_two_ranks_refuse_the_simulated_retriever(run_dir):
    r = _run(["eval", run_dir, "--retriever", "simulated", "--recall", "0.5", *EVAL], ranks=2)
    assert r.returncode == 2 and r.stdout == ""
    assert "--retriever simulated runs in one process" in r.stderr


def test_a_run_missing_on_one_rank_ends_every_rank(run_dir, tmp_path):
    # node-local disks: rank 1 has no copy of the run; the job ends with rank 0 naming rank 1
    missing = str(tmp_path / "nowhere")
    cmd = [MPIEXEC, "-n", "1", *CLI, "eval", run_dir, *EVAL, ":", "-n", "1", *CLI, "eval", missing, *EVAL]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1: ") and missing in lines[0], r.stderr
