"""What every `topkattn` command shares: one-line errors, ``--device``, ``--quiet``/``--progress``
and the progress bar.

Usage errors (a bad option value, a missing argument, a contradictory combination), whether
Click finds them while parsing or a command raises :class:`click.UsageError` itself, print
one line, ``Error: ...``, with exit status 2; :func:`fail` stops a command whose work failed
with one line and exit status 1.  Only Click is imported here, so the CLI starts fast.
"""
import math
import sys

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
DEVICES = ("cpu", "gpu")


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (``Error: ...``) with exit status 2."""

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


def _one_line(ctx, call, *args):
    """``call(*args)`` with any usage error turned into a :class:`OneLineUsageError`."""
    try:
        return call(*args)
    except OneLineUsageError:
        raise
    except click.UsageError as e:
        raise OneLineUsageError(e.format_message(), e.ctx or ctx) from None


class OneLineCommand(click.Command):
    """A command whose usage errors, from parsing or from its callback, print one line
    instead of usage + hint + error."""

    def parse_args(self, ctx, args):
        return _one_line(ctx, super().parse_args, ctx, args)

    def invoke(self, ctx):
        return _one_line(ctx, super().invoke, ctx)


class OneLineGroup(click.Group):
    """A group whose own usage errors (an unknown command, a bad option) print one line."""

    def parse_args(self, ctx, args):
        if not args:  # Click shows the help (no_args_is_help)
            return super().parse_args(ctx, args)
        return _one_line(ctx, super().parse_args, ctx, args)

    def invoke(self, ctx):
        return _one_line(ctx, super().invoke, ctx)


def _rank_zero_reports(call, *args):
    """``call(*args)``; under an MPI launcher an error (usage or failure) is shown by rank 0
    only, the other ranks exit with the same status silently."""
    try:
        return call(*args)
    except click.ClickException as e:
        from topkattn.distributed.comm import launched_world
        where = launched_world()
        if where is not None and where[0] != 0:
            e.show = lambda file=None: None
        raise


class RankZeroCommand(OneLineCommand):
    """:class:`OneLineCommand` whose errors rank 0 alone prints when ``mpiexec`` started it."""

    def parse_args(self, ctx, args):
        return _rank_zero_reports(super().parse_args, ctx, args)

    def invoke(self, ctx):
        return _rank_zero_reports(super().invoke, ctx)


def command(name):
    """``click.command(name)`` with one-line usage errors and ``-h``/``--help``."""
    return click.command(name, cls=RankZeroCommand, context_settings=CONTEXT_SETTINGS)


def agree_click_error(comm, error):
    """Every rank raises when the set-up raised ``error`` (a click error, or None) on any rank:
    the failing rank its own error, the others one of the same exit status naming the rank
    (rank 0 alone prints it): the set-up of an MPI job (e.g. a run missing on one rank's
    node-local disk) never leaves the other ranks waiting in the first collective."""
    errors = comm.allgather(None if error is None else (error.exit_code, error.format_message()))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, (code, message) = failed[0]
        peer = click.ClickException(f"rank {r}: {message}")
        peer.exit_code = code
        raise peer


def load_run_or_fail(run_dir):
    """``(cfg, model)`` of a train-toy run folder: a usage error when it holds no run, a failure
    (exit 1) when its checkpoint is corrupt or the run diverged (parameters or logits not finite:
    decoding it gives only NaN)."""
    from topkattn.training.checkpoint import CheckpointError
    from topkattn.training.runs import load_run
    from topkattn.training.train import nonfinite_parameter

    try:
        cfg, model = load_run(run_dir)
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from None
    except CheckpointError as e:
        fail(str(e))
    bad = nonfinite_parameter(model.params)
    if bad is not None:
        fail(f"the run in {run_dir} diverged: its parameter {bad!r} holds NaN or infinite values")
    if not _finite_logits(model):
        fail(f"the run in {run_dir} diverged: its parameters are finite but so large that its logits are not")
    return cfg, model


def _finite_logits(model):
    """Whether the model's logits for a short probe sequence (every token id in turn) are finite:
    a run saved just before it diverged can hold finite parameters that overflow every forward."""
    import numpy as np

    tokens = np.arange(16, dtype=np.int64)[None] % model.cfg.vocab_size
    was_training = model.training
    try:
        with np.errstate(all="ignore"):  # the overflow is the finding, not a warning to print
            return bool(np.isfinite(model.eval().forward(tokens)).all())
    finally:
        model.train(was_training)


def check_decode_options(run_dir, cfg, retriever, token_options=()):
    """Usage errors for decoding a train-toy run (``cfg``) the way it cannot decode: token top-k
    options (``token_options``: those given, e.g. ``["--k"]``) or a retriever other than exact
    on a block top-k run, and an approximate retriever on a run trained with a tail."""
    if cfg.attention == "block":
        for name in token_options:
            raise click.UsageError(f"{name} applies to token top-k; {run_dir} was trained with block top-k "
                                   f"attention, which decodes with its own block selection")
        if retriever != "exact":
            raise click.UsageError(f"{run_dir} was trained with block top-k attention: it decodes with its block "
                                   f"means (--retriever exact), not --retriever {retriever}")
    if cfg.tail is not None and retriever != "exact":
        raise click.UsageError(f"{run_dir} was trained with --tail {cfg.tail}: its decode scores every cached key "
                               f"for the tail weight (--retriever exact), not --retriever {retriever}")


def given_options(ctx, *names):
    """The options among the parameters ``names`` that the command line set (not left at their
    defaults), each as its long option (e.g. ``--clusters-to-search`` for ``search``)."""
    params = {p.name: p for p in ctx.command.params}
    return [max(params[n].opts, key=len) for n in names
            if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]


def refuse_given(options, only_for):
    """Usage error naming ``options`` (:func:`given_options`' result) when any was given: they apply
    only to ``only_for`` (e.g. ``"--retriever lorann, not exact"``)."""
    if options:
        verb = "applies" if len(options) == 1 else "apply"
        raise click.UsageError(f"{', '.join(options)} {verb} only to {only_for}")


def fail(message):
    """Stop the command (raises, like ``ctx.fail``): ``Error: message`` on stderr, exit status 1
    (the work failed, not the usage)."""
    raise click.ClickException(message)


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and the infinities (which FloatRange lets
    through: NaN compares false with every bound): a usage error naming the option."""

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):  # before the range: "inf is not in the range" says less
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(rv, param, ctx)


def finite_float(value, option):
    """``float(value)`` of a finite number, else a usage error naming ``option``; for options
    parsed by hand (e.g. those taking a number or a word)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise click.UsageError(f"{option} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise click.UsageError(f"{option} must be a finite number, got {value!r}")
    return v


def _check_device(ctx, param, value):
    """--device gpu is a usage error without CuPy and a usable GPU."""
    if value == "gpu":
        from topkattn.backend import require_cupy
        try:
            require_cupy()
        except RuntimeError as e:
            raise click.UsageError(f"--device gpu: {e}") from None
    return value


device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="cpu", show_default=True, callback=_check_device,
    help="cpu: NumPy arrays; gpu: CuPy arrays (needs CuPy and a CUDA GPU).")

_FORCE_PROGRESS = "topkattn.force_progress"  # ctx.meta key set by --progress


def _force_progress(ctx, param, value):
    if value:
        ctx.meta[_FORCE_PROGRESS] = True
    return value


def quiet_option(f):
    """``--quiet`` (no bar; passed to the command as ``quiet``) and ``--progress`` (draw the bar even
    when stderr is not a terminal; read by :func:`progress_bar`, not passed on)."""
    f = click.option("--progress", is_flag=True, expose_value=False, callback=_force_progress,
                     help="Draw the progress bar even when stderr is not a terminal (--quiet wins).")(f)
    return click.option("--quiet", is_flag=True, help="No progress bar on stderr.")(f)


def progress_bar(total, desc, unit, quiet):
    """A tqdm bar on stderr; use it as a context manager.

    Drawn when stderr is a terminal (tqdm's ``disable=None``), or always with ``--progress``;
    never when ``quiet``.
    """
    from tqdm import tqdm

    ctx = click.get_current_context(silent=True)
    forced = ctx is not None and ctx.meta.get(_FORCE_PROGRESS, False)  # meta: shared by nested contexts
    disable = True if quiet else (False if forced else None)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                disable=disable)
