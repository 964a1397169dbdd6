"""`mpiexec -n 2 topkattn train-toy`: data-parallel training from the command line.

Subprocesses under ``mpiexec`` (skipped without it or without mpi4py), each with a timeout:
a job that hangs fails the test instead of the test run.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                                reason="needs mpiexec and mpi4py (pip install -e '.[mpi]')")
TIMEOUT = 300
CLI = [sys.executable, "-c", "from topkattn.cli.main import main; main()", "train-toy"]
TINY = ["--d-model", "16", "--heads", "2", "--seq-len", "12", "--num-kv-pairs", "3", "--vocab-size", "16",
        "--k", "4", "--forget-rate", "0.3", "--steps", "4", "--quiet"]
LAUNCHER = ("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_")


def _env():
    """This checkout first on the path, one BLAS thread, no launcher variables of an outer mpiexec."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER)}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _mpi(*args):
    return _run([MPIEXEC, "-n", "2", *args])


def test_two_ranks_print_one_json_object_and_match_one_process(tmp_path):
    one = _run(CLI + TINY + ["--batch-size", "4", "--json"])
    assert one.returncode == 0, one.stderr
    two = _mpi(*CLI, *TINY, "--batch-size", "4", "--json", "--out", str(tmp_path / "run"))
    assert two.returncode == 0, two.stderr
    lines = two.stdout.splitlines()
    assert len(lines) == 1  # rank 0 alone reports
    m, ref = json.loads(lines[0]), json.loads(one.stdout)
    assert m["last_loss"] == pytest.approx(ref["last_loss"], rel=1e-4)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    assert two.stderr == ""
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["last_loss"] == m["last_loss"]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.npz", "history.json", "metrics.json"]


def test_batch_size_not_a_multiple_of_the_ranks_is_one_usage_error():
    p = _mpi(*CLI, *TINY, "--batch-size", "3")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "Error: --batch-size (3) must be a multiple of the number of MPI ranks (2)"]
    assert p.stdout == ""


def test_kv_experts_under_mpiexec_is_one_usage_error():
    # their balancing loss is one over the whole batch: data parallel would change the losses
    p = _mpi(*CLI, *TINY, "--kv-experts", "2", "--kv-experts-active", "1")
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --kv-experts under mpiexec: the experts' load-balancing")


def test_a_bad_out_on_rank0_ends_every_rank(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    p = _mpi(*CLI, *TINY, "--batch-size", "4", "--out", str(tmp_path / "file" / "run"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --out ") and "is not a writable folder" in lines[0]


def test_an_error_on_one_rank_aborts_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the hook prints the rank and aborts."""
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "from topkattn.distributed.comm import world\n"
        "from topkattn.distributed.comm import install_excepthook\n"
        "comm = world()\n"
        "install_excepthook(comm)\n"
        "if comm.rank == 1:\n"
        "    raise ValueError('no such batch')\n"
        "comm.Barrier()  # never left without the abort\n")
    p = _mpi(sys.executable, str(script))
    assert p.returncode != 0
    assert "Error: rank 1: no such batch" in p.stderr


def test_one_process_never_imports_mpi4py():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from topkattn.cli.main import main\n"
            f"r = CliRunner().invoke(main, {['train-toy', *TINY, '--steps', '1', '--batch-size', '3']!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "print('mpi4py' in sys.modules)\n")
    p = _run([sys.executable, "-c", code])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_a_checkpoint_missing_on_one_rank_ends_every_rank(tmp_path):
    # node-local disks: rank 1's --out holds no checkpoint; it must end the job (rank 0 naming
    # rank 1), not leave rank 0 waiting in the first collective
    here, there = str(tmp_path / "here"), str(tmp_path / "there")
    assert _run([*CLI, *TINY, "--out", here]).returncode == 0
    p = _run([MPIEXEC, "-n", "1", *CLI, "--out", here, "--resume", "--quiet",
              ":", "-n", "1", *CLI, "--out", there, "--resume", "--quiet"])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"Error: rank 1: --resume: no checkpoint at {there}/checkpoint.npz "
                                             f"(the folder holds no train-toy checkpoint)"]
