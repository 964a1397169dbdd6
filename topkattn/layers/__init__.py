"""Transformer layers with hand-written forward/backward pairs (MLA, RMSNorm, RoPE, FFN, ...)."""
