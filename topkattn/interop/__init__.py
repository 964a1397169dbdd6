"""Lazy bridges to PyTorch and JAX (never imported by topkattn itself)."""
