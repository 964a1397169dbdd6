"""`topkattn train-toy`: train a small MLA decoder with top-k (or dense) attention.

Thin: parses options, draws the progress bar, prints the table; the loop is
:func:`topkattn.training.train.train`.
"""
import json
import os
import sys

import click

from topkattn.cli.common import (
    CONTEXT_SETTINGS,
    FiniteFloat,
    RankZeroCommand,
    agree_click_error,
    device_option,
    fail,
    progress_bar,
    quiet_option,
)


class BlasThreads(click.ParamType):
    """--blas-threads: "auto" or an integer >= 0."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or (isinstance(value, int) and value >= 0):
            return value
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            self.fail(f"expected 'auto' or an integer >= 0, got {value!r}", param, ctx)
        return n


@click.command("train-toy", cls=RankZeroCommand, context_settings=CONTEXT_SETTINGS)
@click.option("--task", type=click.Choice(["mqar", "text"]), default="mqar", show_default=True,
              help="mqar: multi-query associative recall (held-out accuracy); text: byte-level LM "
                   "on the Python standard library's sources (held-out bits per character).")
@click.option("--attention", type=click.Choice(["topk", "dense", "block"]), default="topk", show_default=True,
              help="Top-k attention (each query keeps its --k best keys), dense attention, or block "
                   "top-k attention (MoBA: each query attends its --topk-blocks best blocks of --block-size keys).")
@click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Keys kept per query with --attention topk.")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help="Keys per block with --attention block [default: 16].")
@click.option("--topk-blocks", type=click.IntRange(min=1), default=None,
              help="Blocks each query attends with --attention block, its own included [default: 2].")
@click.option("--dense-layers", default=None, callback=lambda ctx, param, value: _layer_list(value),
              help="Comma-separated layer indices (from 0) that keep dense attention, the others "
                   "using --attention topk or block (a hybrid model), e.g. --dense-layers 0.")
@click.option("--tail", type=click.Choice(["none", "mean"]), default=None,
              help="With --attention topk: none (softmax over the kept keys) or mean (the softmax mass of "
                   "the keys not kept goes to their mean value) [default: none].")
@click.option("--forget-rate", type=FiniteFloat(0.0, 1.0, max_open=True), default=0.0,
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
@click.option("--lr", type=FiniteFloat(min=0.0, min_open=True), default=3e-3,
              show_default=True, help="Peak learning rate (linear warmup, then cosine decay to lr/10).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the initialisation, the data and the forgetful masking.")
@click.option("--vocab-size", type=click.IntRange(min=4), default=64, show_default=True,
              help="MQAR vocabulary (keys from the lower half, values from the upper).")
@click.option("--num-kv-pairs", type=click.IntRange(min=1), default=16, show_default=True,
              help="MQAR key-value pairs per sequence (each is queried once).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warmup steps [default: 5% of --steps].")
@click.option("--weight-decay", type=FiniteFloat(0.0, 1.0), default=0.1, show_default=True,
              help="Decoupled AdamW weight decay (matrices only).")
@click.option("--token-shift/--no-token-shift", default=True, show_default=True,
              help="Add x_t + W x_{t-1} to the embeddings (a kernel-2 causal convolution): the "
                   "previous-token feature recall needs; without it attention must discover a "
                   "previous-token head, which takes thousands of steps.")
@click.option("--kv-experts", type=click.IntRange(min=0), default=None,
              help="KV experts: E expert key/value up-projections of MLA, mixed per query token by "
                   "a router over the one shared latent cache [default: 0, none].")
@click.option("--kv-experts-active", type=click.IntRange(min=1), default=None,
              help="Experts each query token mixes (<= --kv-experts) [default: min(2, E)].")
@click.option("--k-rank", type=click.IntRange(min=1), default=None,
              help="DiffQKV: key latent rank (cached and indexed) [default: the shared latent's].")
@click.option("--v-rank", type=click.IntRange(min=1), default=None,
              help="DiffQKV: value latent rank (cached beside the keys) [default: the shared latent's].")
@click.option("--q-head-dim", type=click.IntRange(min=1), default=None,
              help="Query/key head dim (nope + rope), wider than the value head dim (Sigma) "
                   "[default: d-model/heads + the rope dim].")
@click.option("--ternary", is_flag=True, default=None,
              help="Ternary (BitNet b1.58) attention projections, packed at 2 bits per weight at decode.")
@click.option("--act-bits", type=click.IntRange(2, 8), default=None,
              help="With --ternary: per-token absmax activation bits [default: float activations].")
@click.option("--attention-layer", type=click.Choice(["mla", "mha"]), default=None,
              help="The attention layer: mla (multi-head latent attention) or mha (plain multi-head attention, "
                   "head dim d-model/heads; takes --kv-experts and --ternary too) [default: mla].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for checkpoint.npz, metrics.json and history.json.")
@click.option("--resume", is_flag=True,
              help="Continue from --out's checkpoint; options left out take the checkpoint's "
                   "values, options given must match it.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in an --out folder that holds another run's checkpoint (or a "
                   "metrics.json or history.json), replacing those files (without it, such a folder is "
                   "refused unless --resume continues its run).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between checkpoints (one is always written at the end).")
@device_option
@click.option("--blas-threads", type=BlasThreads(), default="auto", show_default=True,
              help="CPU threads while training (the batch's two halves at once, BLAS and the worker pool): "
                   "auto takes the idle cores (one thread for tiny steps); 0 keeps the library's setting.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the final metrics as one JSON object on stdout (the bar stays on stderr).")
@quiet_option
@click.pass_context
def train_toy(ctx, out_dir, resume, overwrite, checkpoint_every, device, blas_threads, as_json, quiet,
              **options):
    """Train a small MLA decoder with top-k attention and report held-out quality.

    \b
    Example:  topkattn train-toy --k 8                 (MQAR, reaches >= 99% held-out accuracy)
              topkattn train-toy --attention dense     (the same model with dense attention)
              topkattn train-toy --task text --out run/ (then: --out run/ --resume)
              mpiexec -n 2 topkattn train-toy --k 8    (data parallel: the batch split over 2 ranks)

    Started by mpiexec with more than one rank (PMI_SIZE or OMPI_COMM_WORLD_SIZE > 1), each
    rank trains on --batch-size / ranks sequences of every batch and the gradients are summed
    with one Allreduce a step: the same losses as one process.  Rank 0 writes the files and
    prints; an error on one rank ends the job ("Error: rank R: ...").
    """
    from tqdm import tqdm

    from topkattn.training.checkpoint import CheckpointError, ConfigMismatchError
    from topkattn.training.runs import resume_config
    from topkattn.training.train import (
        CHECKPOINT_NAME,
        OutDirError,
        RunExistsError,
        RunTooLargeError,
        SaveError,
        TrainConfig,
        check_memory,
        check_run_folder,
        format_bytes,
        probe_out_dir,
        train,
    )

    if resume and out_dir is None:
        raise click.UsageError("--resume needs --out DIR (the folder holding checkpoint.npz)")
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in --out, --overwrite starts over in its place: "
                               "give one of them")
    # every option collected in **options is a TrainConfig field of the same name
    given = {name for name in options
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    values = {name: v for name, v in options.items() if v is not None}
    if values.get("tail") == "none":
        values["tail"] = None  # kept: a given --tail none must match a resumed checkpoint's
    task = values["task"]
    values.setdefault("seq_len", 64 if task == "mqar" else 128)
    values.setdefault("steps", 600 if task == "mqar" else 500)
    values.setdefault("warmup_steps", max(1, values["steps"] // 20))
    comm = _mpi_world()  # None: one process (not started by mpiexec with > 1 rank)
    rank = 0 if comm is None else comm.rank
    setup_error = None
    try:  # under MPI every rank reads its own checkpoint: an error on one rank must end them all
        if resume:
            try:
                values = resume_config(out_dir, values, given, label=_option)
            except (FileNotFoundError, ConfigMismatchError) as e:
                raise click.UsageError(f"--resume: {e}") from None
            except CheckpointError as e:
                fail(str(e))
        _check_attention_options(values, given)
        try:
            cfg = TrainConfig.from_dict(values)
        except (ValueError, TypeError) as e:
            raise click.UsageError(str(e)) from None
        if comm is not None:
            _check_mpi_config(cfg, comm)
    except click.ClickException as e:
        setup_error = e
    if comm is not None:
        agree_click_error(comm, setup_error)
    elif setup_error is not None:
        raise setup_error

    def log(msg):
        if rank == 0:
            tqdm.write(msg, file=sys.stderr)

    desc = f"{cfg.task} {cfg.attention}" + (f" k={cfg.k}" if cfg.attention == "topk" else "") + (
        f" tail={cfg.tail}" if cfg.tail else "") + (
        f" {cfg.block_size}x{cfg.topk_blocks}" if cfg.attention == "block" else "")
    try:
        error = None
        try:  # train() checks both too; here before the bar is drawn (one line)
            check_memory(cfg, device)
            if out_dir is not None and rank == 0:
                check_run_folder(out_dir, resume=resume, overwrite=overwrite)
                probe_out_dir(out_dir)
        except (OutDirError, RunTooLargeError, RunExistsError) as e:
            error = e
        if comm is not None:
            from topkattn.distributed.data_parallel import agree_setup
            agree_setup(comm, error)  # every rank raises when one failed
        elif error is not None:
            raise error
        limit = _blas_limit(blas_threads, log) if comm is not None else _nothing()  # one process: train() applies it
        with progress_bar(cfg.steps, desc, "step", quiet or rank != 0) as bar, limit:
            def progress(step, loss, lr, tok_s):
                bar.update(step - bar.n)  # a resumed run jumps to its checkpoint's step
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)

            if comm is None:
                result = train(cfg, out_dir=out_dir, resume=resume, device=device,
                               checkpoint_every=checkpoint_every, progress=progress, log=log,
                               threads=None if blas_threads == 0 else blas_threads, overwrite=overwrite)
            else:
                from topkattn.distributed.data_parallel import train_data_parallel
                result = train_data_parallel(cfg, comm, out_dir=out_dir, resume=resume, device=device,
                                             checkpoint_every=checkpoint_every, progress=progress, log=log,
                                             overwrite=overwrite)
    except ConfigMismatchError as e:  # a field the checkpoint lacks (an older run)
        raise click.UsageError(str(e)) from None
    except OutDirError as e:  # found before the first step
        raise click.UsageError(f"--out {e.path} is not a writable folder ({e.reason})") from None
    except RunExistsError as e:
        if os.path.basename(e.path) == CHECKPOINT_NAME:
            raise click.UsageError(f"--out {out_dir} already holds a run ({e.path}): --resume continues it, "
                                   f"--overwrite starts over in its place") from None
        raise click.UsageError(f"--out {out_dir} already holds {os.path.basename(e.path)}, which this run would "
                               f"replace: --overwrite replaces it, or give another --out") from None
    except RunTooLargeError as e:
        vocab = f" --vocab-size {cfg.vocab_size}" if cfg.task == "mqar" else ""
        raise click.UsageError(
            f"the run needs at least {format_bytes(e.estimate)} of memory (a lower-bound estimate for "
            f"--batch-size {cfg.batch_size} --seq-len {cfg.seq_len}{vocab} --d-model {cfg.d_model} --layers "
            f"{cfg.layers}), more than this machine's {format_bytes(e.available)}: lower {_options_to_lower(cfg)}"
        ) from None
    except (CheckpointError, FloatingPointError) as e:  # with MPI: raised on every rank alike
        fail(str(e))
    except SaveError as e:
        if comm is not None:  # rank 0 alone writes: end the job, the others wait in a collective
            from topkattn.distributed.comm import abort
            abort(comm, e)
        fail(str(e))
    except RuntimeError as e:
        from topkattn.distributed.data_parallel import PeerError
        if not isinstance(e, PeerError):
            raise  # with MPI the excepthook ends the job
        if e.kind in ("OutDirError", "RunTooLargeError", "ConfigMismatchError", "RunExistsError"):
            raise click.UsageError(str(e)) from None  # the failing rank's status: 2
        fail(str(e))
    if rank != 0:
        return
    m = result.metrics
    if as_json:
        click.echo(json.dumps(m, sort_keys=True))
    else:
        click.echo(format_table([m]))
        if out_dir is not None:
            click.echo(f"checkpoint and metrics in {out_dir}")


def _options_to_lower(cfg):
    """The size options (``"--batch-size or --seq-len"``, ``"--vocab-size"``, ``"--d-model"`` or
    ``"--layers"``) whose smallest values cut the run's memory estimate most: what to lower
    when the run does not fit."""
    import copy

    from topkattn.training.train import step_memory_estimate

    groups = [("--batch-size or --seq-len", {"batch_size": 1, "seq_len": 2}), ("--d-model", {"d_model": 4 * cfg.heads}),
              ("--layers", {"layers": 1})]
    if cfg.task == "mqar":  # the text task's vocabulary is the 256 bytes
        groups.insert(1, ("--vocab-size", {"vocab_size": 4}))
    best, least = groups[0][0], None
    for options, smallest in groups:
        small = copy.copy(cfg)  # only estimated, never built: the fields need not make a valid run together
        for field, value in smallest.items():
            setattr(small, field, value)
        try:
            need = step_memory_estimate(small)
        except (ValueError, TypeError):
            continue
        if least is None or need < least:
            best, least = options, need
    return best


def _mpi_world():
    """``MPI.COMM_WORLD`` when mpiexec started this process as one of several ranks (read from
    the launcher's environment, see :func:`topkattn.distributed.comm.launched_world`),
    else None, without importing mpi4py.  Installs the hook that ends the job on an uncaught
    error; a usage error when mpi4py is missing."""
    from topkattn.distributed.comm import install_excepthook, launched_world
    if launched_world() is None:
        return None
    from topkattn.distributed.comm import world
    try:
        comm = world()
    except ImportError as e:
        raise click.UsageError(f"train-toy under mpiexec: {e}") from None
    if comm.size == 1:
        return None
    install_excepthook(comm)
    return comm


def _check_mpi_config(cfg, comm):
    """Usage errors for a run data parallelism cannot train: --batch-size not a multiple of the
    ranks, --kv-experts (its whole-batch balancing loss)."""
    if cfg.kv_experts:
        raise click.UsageError(f"--kv-experts under mpiexec: the experts' load-balancing loss is one over the "
                               f"whole batch, which {comm.size} ranks would split; train KV experts in one process")
    if cfg.batch_size % comm.size:
        raise click.UsageError(f"--batch-size ({cfg.batch_size}) must be a multiple of the number of "
                               f"MPI ranks ({comm.size})")


def _layer_list(value):
    """--dense-layers "I,J" as a list of ints (None stays None); a usage error otherwise."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise click.UsageError(f"--dense-layers must be comma-separated layer indices like 0,2, got {value!r}")
    return [int(p) for p in parts]


def _check_attention_options(values, given):
    """Usage errors for MQAR options with --task text, block options without --attention block,
    --tail mean without --attention topk or with --forget-rate, and --dense-layers out of range."""
    if values["task"] != "mqar":
        for name in ("vocab_size", "num_kv_pairs"):
            if name in given:
                raise click.UsageError(f"{_option(name)} applies only to --task mqar; --task {values['task']} is "
                                       f"byte level (a vocabulary of 256)")
    if values.get("tail") is not None:
        if values["attention"] != "topk":
            raise click.UsageError(f"--tail {values['tail']} applies to --attention topk (token top-k), got "
                                   f"--attention {values['attention']}")
        if values.get("forget_rate"):
            raise click.UsageError(f"--tail {values['tail']} does not combine with --forget-rate (the tail op "
                                   f"draws no forgetting), got --forget-rate {values['forget_rate']:g}")
    if values["attention"] != "block":
        for name in ("block_size", "topk_blocks"):
            if name in given:
                raise click.UsageError(f"{_option(name)} applies only with --attention block, "
                                       f"got --attention {values['attention']}")
    elif "k" in given:
        raise click.UsageError("--k applies to --attention topk; --attention block takes --block-size and "
                               "--topk-blocks")
    if values["attention"] == "dense":
        for name in ("k", "forget_rate"):
            if name in given:
                raise click.UsageError(f"{_option(name)} applies to --attention topk; --attention dense attends "
                                       f"every key")
    layers = values.get("layers", 2)
    for i in values.get("dense_layers") or ():
        if i >= layers:
            raise click.UsageError(f"--dense-layers: layer {i} does not exist with --layers {layers} "
                                   f"(indices 0..{layers - 1})")
    if len(set(values.get("dense_layers") or ())) != len(values.get("dense_layers") or ()):
        raise click.UsageError(f"--dense-layers repeats a layer: {values['dense_layers']}")


def _option(field):
    """The command-line option of a TrainConfig field (``d_model`` -> ``--d-model``)."""
    return "--" + field.replace("_", "-")


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def _blas_limit(n, log):
    """A context limiting BLAS threads to ``n`` (threadpoolctl); a no-op for 0, "auto" or without it."""
    import contextlib
    if n == 0 or n == "auto":
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log(f"note: --blas-threads {n} needs threadpoolctl (pip install threadpoolctl); "
            f"set OPENBLAS_NUM_THREADS={n} instead")
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


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
        c = m.get("config", {})
        k = f"{c.get('block_size')}x{c.get('topk_blocks')}" if m["attention"] == "block" else (
            "-" if m["k"] is None else str(m["k"]))
        if c.get("tail"):
            k += f" {c['tail']}-tail"
        if c.get("dense_layers"):
            k += " dense " + ",".join(str(i) for i in c["dense_layers"])
        lines.append([m["task"], m["attention"], k,
                      f"{m['forget_rate']:g}", str(m["steps"]), f"{m['train_loss']:.4f}", quality,
                      "-" if tok is None else f"{tok:,.0f}", f"{m['seconds']:.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]

    def fmt(r):
        return "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])
