"""Scale-out over MPI (mpi4py; imported on first use, so nothing here needs it at import time).

    comm              mpi4py on demand, agreement on errors, host-buffer collectives
    context_parallel  exact top-k attention over keys sharded along S:
                      topk_attention, topk_attention_forward, topk_attention_backward
    sharded_decoding  decode with the search sharded by position: ShardedSelector,
                      sharded_selector_factory, shard_positions

Run a script under ``mpiexec -n N python script.py``; every rank passes the same queries and
its own slice of the keys and values (``key_offset``).
"""
from topkattn.distributed.comm import INSTALL_HINT, require_mpi, world
from topkattn.distributed.context_parallel import topk_attention, topk_attention_backward, topk_attention_forward
from topkattn.distributed.sharded_decoding import ShardedSelector, shard_positions, sharded_selector_factory

__all__ = ["INSTALL_HINT", "ShardedSelector", "require_mpi", "shard_positions", "sharded_selector_factory",
           "topk_attention", "topk_attention_backward", "topk_attention_forward", "world"]
