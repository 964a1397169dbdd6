"""`mpiexec -n 2 topkattn eval RUN` on a block top-k run: the same result as one process.

Trains a tiny hybrid block run (`train-toy --attention block --block-size 48 --dense-layers 1`,
sequences of 200) and compares `topkattn eval --json` in one process with the same command under
`mpiexec -n 2`: the sharding block defaults to 96 (64 rounded up to a multiple of 48), so both
ranks own selection blocks.  A run with layers sharded decoding does not run (KV experts) gets a
usage error.  Skipped without mpiexec or mpi4py.
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
EVAL = ["--n-sequences", "6", "--batch-size", "3", "--json", "--quiet"]
TINY = ["--task", "mqar", "--layers", "2", "--d-model", "16", "--heads", "2", "--batch-size", "4", "--vocab-size",
        "16", "--num-kv-pairs", "3", "--quiet"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
                                                             "OMPI_COMM_WORLD_RANK")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return env


def _run(args, ranks=1):
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + CLI + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def _train(tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("run") / "run"
    r = _run(["train-toy", *TINY, *args, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    return _train(tmp_path_factory, "--attention", "block", "--block-size", "48", "--topk-blocks", "2",
                  "--dense-layers", "1", "--seq-len", "200", "--steps", "20")


def _one_json(r):
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout  # rank 0 speaks, the others do not
    return json.loads(lines[0])


def test_two_ranks_block_run_equals_one_process(block_run):
    one = _one_json(_run(["eval", block_run, *EVAL]))
    two = _one_json(_run(["eval", block_run, *EVAL], ranks=2))
    assert one["ranks"] == 1 and two["ranks"] == 2 and two["train_block"] == [48, 2]
    assert one["n_scored"] == two["n_scored"] > 0
    # the same blocks and keys attended in every layer and step (the stats), so the same predictions;
    # the attention is merged by log-sum-exp over the ranks' keys: the loss agrees to float32 rounding
    for key in ("accuracy", "attention_stats", "per_layer", "mean_k", "recall", "k"):
        assert two[key] == one[key], key
    total = two["attention_stats"]["layers"][0]["total"]
    assert total["blocks_per_query_mean"] > 1  # blocks besides the own one were chosen across the ranks
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_two_ranks_refuse_a_variant_run_with_a_usage_error(tmp_path_factory):
    run = _train(tmp_path_factory, "--k", "3", "--kv-experts", "2", "--seq-len", "40", "--steps", "1")
    r = _run(["eval", run, *EVAL], ranks=2)
    assert r.returncode == 2 and r.stdout == ""
    assert "decode it in one process" in r.stderr
