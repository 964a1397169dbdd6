"""topkattn.ann: a LoRANN index (IVF + per-cluster reduced-rank regression) in NumPy/Numba.

``from topkattn.ann import LorannIndex`` mirrors the reference ``lorann`` package.
"""
from topkattn.ann.index import LorannIndex

__all__ = ["LorannIndex"]
