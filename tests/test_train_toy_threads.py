"""train-toy --blas-threads reaches train(threads=...) (issue 21): "auto" (the default) is the
size policy, an integer is used as given, 0 leaves the library's settings; results do not change."""
import json

from click.testing import CliRunner

from topkattn.cli.main import main

TINY = ["train-toy", "--d-model", "16", "--heads", "2", "--seq-len", "12", "--num-kv-pairs", "3",
        "--vocab-size", "16", "--batch-size", "4", "--steps", "2", "--quiet", "--json"]


def _run(*extra):
    r = CliRunner().invoke(main, [*TINY, *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_blas_threads_reaches_train():
    auto = _run()  # the default: auto, one thread for a tiny step
    assert auto["threads"] == 1
    two = _run("--blas-threads", "2")
    assert two["threads"] == 2
    assert _run("--blas-threads", "0")["threads"] is None  # the library's settings left alone
    assert two["train_loss"] == auto["train_loss"] and two["accuracy"] == auto["accuracy"]


def test_blas_threads_refuses_other_values():
    for bad in ("-1", "many", "1.5"):
        r = CliRunner().invoke(main, [*TINY, "--blas-threads", bad])
        assert r.exit_code == 2 and "--blas-threads" in r.output and "auto" in r.output, r.output
