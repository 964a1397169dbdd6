"""`topkattn train-toy`: train a small MLA decoder with top-k (or dense) attention.

Thin: parses options, draws the progress bar, prints the table; the loop is
:func:`topkattn.training.train.train`.
"""
import json
import os
import sys

import click



class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (``Error: ...``) with exit status 2."""

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


class OneLineCommand(click.Command):
    """A command whose option errors print one line instead of usage + hint + error."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if isinstance(e, OneLineUsageError):
                raise
            raise OneLineUsageError(e.format_message(), ctx) from None


# option name -> TrainConfig field (the options that define the run and live in the checkpoint)
CONFIG_OPTIONS = {
    "task": "task", "attention": "attention", "k": "k", "forget_rate": "forget_rate",
    "layers": "layers", "d_model": "d_model", "heads": "heads", "seq_len": "seq_len",
    "steps": "steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
    "vocab_size": "vocab_size", "num_kv_pairs": "num_kv_pairs", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "token_shift": "token_shift",
}


@click.command("train-toy", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", type=click.Choice(["mqar", "text"]), default="mqar", show_default=True,
              help="mqar: multi-query associative recall (held-out accuracy); text: byte-level LM "
                   "on the Python standard library's sources (held-out bits per character).")
@click.option("--attention", type=click.Choice(["topk", "dense"]), default="topk", show_default=True,
              help="Top-k attention (each query keeps its --k best keys) or dense attention.")
@click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Keys kept per query with --attention topk.")
@click.option("--forget-rate", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True, help="Forgetful masking: drop each selected key with this "
                                      "probability and refill from the next-ranked keys.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoder blocks.")
@click.option("--d-model", type=click.IntRange(min=4), default=64, show_default=True,
              help="Model width.")
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Attention heads (must divide --d-model).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per training sequence [default: 64 for mqar, 128 for text].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps [default: 600 for mqar, 500 for text].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sequences per step.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=3e-3,
              show_default=True, help="Peak learning rate (linear warmup, then cosine decay to lr/10).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the initialisation, the data and the forgetful masking.")
@click.option("--vocab-size", type=click.IntRange(min=4), default=64, show_default=True,
              help="MQAR vocabulary (keys from the lower half, values from the upper).")
@click.option("--num-kv-pairs", type=click.IntRange(min=1), default=16, show_default=True,
              help="MQAR key-value pairs per sequence (each is queried once).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warmup steps [default: 5% of --steps].")
@click.option("--weight-decay", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Decoupled AdamW weight decay (matrices only).")
@click.option("--token-shift/--no-token-shift", default=True, show_default=True,
              help="Add x_t + W x_{t-1} to the embeddings (a kernel-2 causal convolution): the "
                   "previous-token feature recall needs; without it attention must discover a "
                   "previous-token head, which takes thousands of steps.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for checkpoint.npz, metrics.json and history.json.")
@click.option("--resume", is_flag=True,
              help="Continue from --out's checkpoint; options left out take the checkpoint's "
                   "values, options given must match it.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between checkpoints (one is always written at the end).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: NumPy arrays; gpu: CuPy arrays (needs CuPy and a CUDA GPU).")
@click.option("--blas-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="BLAS threads while training (the toy matrices are small: with more threads "
                   "OpenBLAS can be many times slower); 0 keeps the library's setting.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the final metrics as one JSON object on stdout (the bar stays on stderr).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train_toy(ctx, out_dir, resume, checkpoint_every, device, blas_threads, as_json, quiet,
              **options):
    """Train a small MLA decoder with top-k attention and report held-out quality.

    \b
    Example:  topkattn train-toy --k 8                 (MQAR, reaches >= 99% held-out accuracy)
              topkattn train-toy --attention dense     (the same model with dense attention)
              topkattn train-toy --task text --out run/ (then: --out run/ --resume)
    """
    from topkattn.training.checkpoint import CheckpointError, ConfigMismatchError, load_training_state
    from topkattn.training.train import CHECKPOINT_NAME, TrainConfig, saved_config, train

    if resume and out_dir is None:
        raise OneLineUsageError("--resume needs --out DIR (the folder holding checkpoint.npz)", ctx)
    given = {name for name in CONFIG_OPTIONS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    values = {CONFIG_OPTIONS[n]: v for n, v in options.items() if v is not None}
    task = values["task"]
    values.setdefault("seq_len", 64 if task == "mqar" else 128)
    values.setdefault("steps", 600 if task == "mqar" else 500)
    values.setdefault("warmup_steps", max(1, values["steps"] // 20))

    if resume:
        path = os.path.join(out_dir, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise OneLineUsageError(f"--resume: no checkpoint at {path}", ctx)
        try:
            saved = saved_config(load_training_state(path))
        except CheckpointError as e:
            _fail(str(e), code=1)
        mismatched = sorted(f for f in (CONFIG_OPTIONS[n] for n in given)
                            if f in saved and saved[f] != values[f])
        if mismatched:
            detail = ", ".join(f"--{f.replace('_', '-')} (checkpoint {saved[f]!r}, now {values[f]!r})"
                               for f in mismatched)
            raise OneLineUsageError(f"options do not match the checkpoint {path}: {detail}", ctx)
        values = {**values, **{f: v for f, v in saved.items()
                               if f not in {CONFIG_OPTIONS[n] for n in given}}}
    try:
        cfg = TrainConfig.from_dict(values)
    except ValueError as e:
        raise OneLineUsageError(str(e), ctx) from None
    if device == "gpu":
        from topkattn.backend import require_cupy
        try:
            require_cupy()
        except RuntimeError as e:
            raise OneLineUsageError(f"--device gpu: {e}", ctx) from None

    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{cfg.task} {cfg.attention}"
                   + (f" k={cfg.k}" if cfg.attention == "topk" else ""),
                   unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def progress(step, loss, lr, tok_s):
        if bar is not None:
            if bar.n == 0 and step > 1:
                bar.update(step - 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)

    def log(msg):
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            click.echo(msg, err=True)

    try:
        with _blas_limit(blas_threads, log):
            result = train(cfg, out_dir=out_dir, resume=resume, device=device,
                           checkpoint_every=checkpoint_every, progress=progress, log=log)
    except ConfigMismatchError as e:
        _close(bar)
        raise OneLineUsageError(str(e), ctx) from None
    except (CheckpointError, FloatingPointError) as e:
        _close(bar)
        _fail(str(e), code=1)
    _close(bar)
    m = result.metrics
    if as_json:
        click.echo(json.dumps(m, sort_keys=True))
    else:
        click.echo(format_table([m]))
        if out_dir is not None:
            click.echo(f"checkpoint and metrics in {out_dir}")


def _blas_limit(n, log):
    """A context limiting BLAS threads to ``n`` (threadpoolctl); a no-op for 0 or without it."""
    import contextlib
    if n == 0:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log(f"note: --blas-threads {n} needs threadpoolctl (pip install threadpoolctl); "
            f"set OPENBLAS_NUM_THREADS={n} instead")
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _close(bar):
    if bar is not None:
        bar.close()


def _fail(msg, code):
    click.echo(f"Error: {msg}", err=True)
    sys.exit(code)


def format_table(rows):
    """A plain-text table of metrics dicts (one row each)."""
    head = ["task", "attention", "k", "forget", "steps", "train loss", "held-out", "tokens/s", "seconds"]
    lines = []
    for m in rows:
        if m["task"] == "mqar":
            quality = f"acc {100 * m['accuracy']:.2f}%"
        else:
            quality = f"{m['bits_per_char']:.3f} bpc"
        tok = m.get("tokens_per_s")
        lines.append([m["task"], m["attention"], "-" if m["k"] is None else str(m["k"]),
                      f"{m['forget_rate']:g}", str(m["steps"]), f"{m['train_loss']:.4f}", quality,
                      "-" if tok is None else f"{tok:,.0f}", f"{m['seconds']:.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])
