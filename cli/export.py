"""`topkattn export RUN_DIR OUT.safetensors`: a train-toy run's weights as safetensors.

Thin: loads the run, checks the destination, calls :meth:`topkattn.model.Transformer.to_safetensors`
(atomic write; the model config as JSON in the file's metadata, the training config beside it).
"""
import json
import os

import click

from topkattn.cli.common import command, fail, load_run_or_fail

TRAIN_CONFIG_KEY = "topkattn.train_config"  # the run's TrainConfig as JSON, in the safetensors metadata


@command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]), default=None,
              help="Tensor dtype in the file [default: the model's, float32 for train-toy runs].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (path, tensors, bytes).")
def export(run_dir, out, dtype, force, as_json):
    """Write a train-toy run's weights to OUT as safetensors, the model config in its metadata.

    \b
    Example:  topkattn export run/ model.safetensors
              topkattn export run/ model-fp16.safetensors --dtype float16 --force

    Load it back with topkattn.model.Transformer.from_safetensors(path) (the same logits for
    float32), or read the tensors from PyTorch, JAX or NumPy with the safetensors package
    (pip install 'topkattn[export]').  The file is written atomically; an existing OUT is
    kept unless --force, and the run's own files (checkpoint.npz, metrics.json, history.json)
    are never OUT.
    """
    from topkattn.training.train import CHECKPOINT_NAME, HISTORY_NAME, METRICS_NAME

    own = {os.path.realpath(os.path.join(run_dir, n)) for n in (CHECKPOINT_NAME, METRICS_NAME, HISTORY_NAME)}
    if os.path.realpath(out) in own:  # even with --force: the run would lose what it is made of
        raise click.UsageError(f"OUT {out!r} is a file of the run in {run_dir}; write the export elsewhere")
    if os.path.exists(out) and not force:
        raise click.UsageError(f"OUT {out!r} exists; pass --force to replace it")
    cfg, model = load_run_or_fail(run_dir)
    try:
        model.to_safetensors(out, dtype=dtype, metadata={TRAIN_CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True)})
    except ImportError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    info = {"path": out, "tensors": len(model.params), "parameters": model.n_params(),
            "dtype": dtype or model.cfg.dtype, "bytes": os.path.getsize(out)}
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
    else:
        click.echo(f"wrote {out}: {info['tensors']} tensors, {info['parameters']:,} parameters, {info['dtype']}, "
                   f"{info['bytes']:,} bytes")
