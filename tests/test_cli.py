"""What every `topkattn` command shares: ``--help``, one-line usage errors with exit status 2,
the same ``--device`` choices; and the resume merge behind ``train-toy --resume``
(:func:`topkattn.training.runs.resume_config`)."""
import pytest
from click.testing import CliRunner

from topkattn.cli.main import main
from topkattn.training.checkpoint import ConfigMismatchError
from topkattn.training.runs import resume_config
from topkattn.training.train import TrainConfig, train


@pytest.mark.parametrize("command", ["train-toy", "eval", "embed"])
def test_help(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0 and r.output.startswith(f"Usage: main {command} ")
    assert CliRunner().invoke(main, [command, "-h"]).output == r.output


@pytest.mark.parametrize("args, needle", [
    # a bad option value, a missing argument (or option value), a contradictory combination
    (["train-toy", "--k", "zero"], "'--k': 'zero' is not a valid integer"),
    (["train-toy", "--k"], "Option '--k' requires an argument"),
    (["train-toy", "--resume"], "--resume needs --out"),
    (["train-toy", "--lr", "nan"], "'--lr': 'nan' is not a finite number."),
    (["train-toy", "--lr", "inf"], "'--lr': 'inf' is not a finite number."),
    (["train-toy", "--forget-rate", "nan"], "'--forget-rate': 'nan' is not a finite number."),
    (["train-toy", "--weight-decay", "nan"], "'--weight-decay': 'nan' is not a finite number."),
    (["eval", "run", "--retriever", "best"], "'--retriever': 'best' is not one of"),
    (["eval"], "Missing argument 'RUN_DIR'"),
    (["eval", "run", "--retriever", "simulated"], "needs --recall"),
    (["embed", "--k", "0", "x"], "'--k': expected an integer >= 1 or 'auto', got '0'"),
    (["embed", "--dense-layers", "x", "x"], "'--dense-layers': expected comma-separated integers"),
    (["embed"], "Missing argument 'TEXTS...'"),
    (["embed", "--tail", "mean", "x"], "apply only with --k"),
    (["embed", "--sinks", "1", "x"], "apply only with --k"),
    (["embed", "--device", "cuda", "x"], "'--device': 'cuda' is not one of 'cpu', 'gpu'"),
    (["bogus"], "No such command 'bogus'"),
    (["--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line_exit_2(args, needle):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert r.stdout == ""  # errors go to stderr


def test_device_choices_are_the_same_everywhere():
    choices = {}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.name == "device":
                choices[name] = (tuple(p.type.choices), p.default)
    assert choices == {name: (("cpu", "gpu"), "cpu") for name in ("train-toy", "eval", "embed")}


@pytest.mark.parametrize("command", ["train-toy", "embed"])
def test_device_gpu_without_a_gpu_is_one_line(command):
    from topkattn.backend import require_cupy
    try:
        require_cupy()
        pytest.skip("a usable GPU is present")
    except RuntimeError:
        pass
    r = CliRunner().invoke(main, [command, "--device", "gpu", *(["x"] if command == "embed" else [])])
    assert r.exit_code == 2 and r.output.startswith("Error: --device gpu: ") and r.output.count("\n") == 1


def test_every_command_uses_the_one_line_class():
    from topkattn.cli.common import OneLineCommand, OneLineGroup
    assert isinstance(main, OneLineGroup)
    assert all(isinstance(cmd, OneLineCommand) for cmd in main.commands.values())


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(d_model=16, heads=2, seq_len=12, num_kv_pairs=3, vocab_size=16, batch_size=4,
                      steps=2, warmup_steps=1, eval_size=8, k=3)
    train(cfg, out_dir=str(out))
    return str(out), cfg


def test_resume_config_takes_left_out_fields_from_the_checkpoint(saved_run):
    out, cfg = saved_run
    given_values = {**TrainConfig().to_dict(), "k": 3, "seed": 0}  # defaults, except what is given
    merged = resume_config(out, given_values, {"k", "seed"})
    assert merged == cfg.to_dict()
    assert resume_config(out, given_values, set()) == cfg.to_dict()


def test_resume_config_refuses_given_fields_the_checkpoint_contradicts(saved_run):
    out, cfg = saved_run
    values = {**cfg.to_dict(), "k": 5, "d_model": 32, "lr": 1.0}
    with pytest.raises(ConfigMismatchError) as e:
        resume_config(out, values, {"k", "d_model", "seed"})
    assert e.value.fields == ["d_model", "k"]  # lr differs too but was not given: it is taken
    assert "d_model (checkpoint 16, now 32)" in str(e.value) and "lr" not in str(e.value)
    with pytest.raises(ConfigMismatchError, match=r"--d-model \(checkpoint 16, now 32\)"):
        resume_config(out, values, {"d_model"}, label=lambda f: "--" + f.replace("_", "-"))
    assert resume_config(out, values, {"seed"})["lr"] == cfg.lr


def test_resume_config_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resume_config(str(tmp_path), TrainConfig().to_dict(), set())


def test_finite_float_type():
    import click

    from topkattn.cli.common import FiniteFloat, finite_float
    t = FiniteFloat(0.0, 1.0)
    assert t.convert("0.5", None, None) == 0.5
    for bad in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(click.BadParameter, match="is not a finite number"):
            t.convert(bad, None, None)
    with pytest.raises(click.BadParameter, match="not in the range"):
        t.convert("2", None, None)
    assert finite_float("1e3", "--x") == 1000.0
    with pytest.raises(click.UsageError, match="--x must be a finite number, got 'inf'"):
        finite_float("inf", "--x")
    with pytest.raises(click.UsageError, match="--x must be a number, got 'one'"):
        finite_float("one", "--x")
