"""topkattn.ann: a LoRANN index (IVF + per-cluster reduced-rank regression) in NumPy/Numba.

``from topkattn.ann import LorannIndex, IP, L2`` is a drop-in for the reference ``lorann``
package (same positional arguments, ``IP``/``L2`` constants, ``n_threads``,
``get_dissimilarity``; results are int64 ids and float32 distances where the reference
returns int32 and float64, see ``topkattn.ann.index``)::

    index = LorannIndex(keys, 256, None, 8, 32, 5, IP)   # or distance="ip"
    index.build(True, False, training_queries=queries_sample)  # approximate, verbose
    ids = index.search(q, k=10, clusters_to_search=24, points_to_rerank=50)   # (Q, 10) int64
    ids, dist = index.search(q, 10, 24, 50, True)                             # dist = -q.x
    index.add(new_key)                                 # searchable at once, no rebuild
    index = LorannIndex(keys, 256, max_cluster_size=2048, background=True)  # grows without stalls:
    # big clusters split and grown ones refit in a maintenance thread (index.maintain() to do it now)
    index.save("keys.lorann.npz"); index = LorannIndex.load("keys.lorann.npz")

Modules: ``index`` (the class), ``kmeans`` (IVF partition), ``rrr`` (reduced-rank
regression fit), ``quant`` (8/4-bit row quantisation), ``kernels`` (Numba search
kernels), ``persist`` (versioned, checksummed, pickle-free files, checked for
consistency on load), ``rwlock`` (the readers-writer lock that lets threads share an
index: searches run together, ``add``/``refit``/``build`` alone).
"""
from topkattn.ann.index import IP, L2, LorannIndex

__all__ = ["IP", "L2", "LorannIndex"]
