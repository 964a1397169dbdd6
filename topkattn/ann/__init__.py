"""topkattn.ann: a LoRANN index (IVF + per-cluster reduced-rank regression) in NumPy/Numba.

``from topkattn.ann import LorannIndex`` mirrors the reference ``lorann`` package::

    index = LorannIndex(keys, n_clusters=256, global_dim=None, quantization_bits=8, rank=32)
    index.build(training_queries=queries_sample)      # queries from the search distribution
    ids = index.search(q, k=10, clusters_to_search=24, points_to_rerank=50)   # (Q, 10) int64
    ids, dist = index.search(q, 10, 24, 50, return_distances=True)           # dist = -q.x
    index.add(new_key)                                 # searchable at once, no rebuild
    index.save("keys.lorann.npz"); index = LorannIndex.load("keys.lorann.npz")

Modules: ``index`` (the class), ``kmeans`` (IVF partition), ``rrr`` (reduced-rank
regression fit), ``quant`` (8/4-bit row quantisation), ``kernels`` (Numba search
kernels), ``persist`` (versioned, checksummed, pickle-free files, checked for
consistency on load), ``rwlock`` (the readers-writer lock that lets threads share an
index: searches run together, ``add``/``refit``/``build`` alone).
"""
from topkattn.ann.index import LorannIndex

__all__ = ["LorannIndex"]
