"""Pretrained models re-implemented with the engine (BERT-style encoders)."""
