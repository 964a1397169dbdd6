"""Runs on disk: a train-toy ``--out`` folder back as its config and trained model, and the
config to resume one with.

Decoding and evaluation read runs through :func:`load_run`; they never import the loop.
:func:`resume_config` merges the settings given for a resumed run with its checkpoint's.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from topkattn.model import Transformer
from topkattn.training.checkpoint import CheckpointError, ConfigMismatchError, config_differences, load_training_state
from topkattn.training.train import CHECKPOINT_NAME, TrainConfig, load_params, make_task, model_config, saved_config


def load_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, Transformer]:
    """``(train_cfg, model)`` of a train-toy run folder (its ``checkpoint.npz``), model on the CPU.

    The model is the run's :class:`topkattn.model.Transformer` (token shift as the run was
    trained; a checkpoint from before token shift existed has none).  Raises
    FileNotFoundError without a checkpoint and :class:`CheckpointError` for a corrupt or
    ill-fitting one.
    """
    path, state, cfg = _load_checkpoint_config(run_dir, "RUN_DIR must be a train-toy --out folder")
    model = Transformer(model_config(cfg, make_task(cfg).vocab_size))
    load_params(model, state["params"], path)
    return cfg, model


def resume_config(out_dir: str | os.PathLike, values: Mapping[str, Any], given: Iterable[str], *,
                  label: Callable[[str], str] = str) -> dict[str, Any]:
    """The config dict to resume the run in ``out_dir`` with: its checkpoint's config, with
    ``values`` for the fields that are not in it.

    ``values``: field -> value (defaults included); ``given``: the fields set explicitly,
    which must equal the checkpoint's, while the others take the checkpoint's values.
    ``label(field)`` names a field in the error message (e.g. as a command-line option).
    Raises FileNotFoundError without a checkpoint, :class:`CheckpointError` for a corrupt
    one, and :class:`ConfigMismatchError` naming every given field the checkpoint contradicts.
    """
    path, _, cfg = _load_checkpoint_config(out_dir, "the folder holds no train-toy checkpoint")
    saved = cfg.to_dict()
    diffs = config_differences({f: saved[f] for f in given if f in saved}, {f: values[f] for f in given if f in saved})
    if diffs:
        detail = ", ".join(f"{label(f)} (checkpoint {a!r}, now {b!r})" for f, a, b in diffs)
        raise ConfigMismatchError(f"the checkpoint {path} does not match: {detail}", [f for f, _, _ in diffs])
    return {**values, **{f: v for f, v in saved.items() if f not in given}}


def _load_checkpoint_config(run_dir, hint):
    """``(path, training state, TrainConfig)`` of the checkpoint in ``run_dir``.

    FileNotFoundError (with ``hint``) when there is none; :class:`CheckpointError` when it is
    corrupt or its config is not a valid TrainConfig.
    """
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} ({hint})")
    state = load_training_state(path)
    try:
        cfg = TrainConfig.from_dict(saved_config(state))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {e}") from e
    return path, state, cfg
