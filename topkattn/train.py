"""Compatibility name: the training loop lives in :mod:`topkattn.training.train`.

``topkattn.train.train`` and ``topkattn.train.TrainConfig`` keep working; new code imports
from :mod:`topkattn.training`.
"""
from topkattn.training.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
