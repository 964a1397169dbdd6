"""Training: the toy training loop, AdamW, the tasks, checkpoints and finished runs.

    train       TrainConfig, train(): a small MLA decoder on MQAR or text, exact resume
    optim       AdamW, global-norm clipping, warmup + cosine schedule
    tasks       MQAR (multi-query associative recall) and a byte-level text corpus
    checkpoint  training state in the checksummed container of :mod:`topkattn.storage`
    runs        load_run: a finished run folder back as (config, model); resume_config
"""
from topkattn.training.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
