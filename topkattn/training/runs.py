"""Finished runs: a train-toy ``--out`` folder back as its config and trained model.

Decoding and evaluation read runs through :func:`load_run`; they never import the loop.
"""
import os

from topkattn.model import Transformer
from topkattn.training.checkpoint import CheckpointError, load_training_state
from topkattn.training.train import (CHECKPOINT_NAME, TrainConfig, load_params, make_task, model_config,
                                     saved_config)


def load_run(run_dir):
    """``(train_cfg, model)`` of a train-toy run folder (its ``checkpoint.npz``), model on the CPU.

    The model is the run's :class:`topkattn.model.Transformer` (token shift as the run was
    trained; a checkpoint from before token shift existed has none).  Raises
    FileNotFoundError without a checkpoint and :class:`CheckpointError` for a corrupt or
    ill-fitting one.
    """
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (RUN_DIR must be a train-toy --out folder)")
    state = load_training_state(path)
    try:
        cfg = TrainConfig.from_dict(saved_config(state))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {e}") from e
    model = Transformer(model_config(cfg, make_task(cfg).vocab_size))
    load_params(model, state["params"], path)
    return cfg, model
