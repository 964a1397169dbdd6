"""Scale-out over MPI (mpi4py; imported on first use, so nothing here needs it at import time).

    comm              mpi4py on demand, agreement on errors, the array collectives (one dispatch:
                      NumPy through MPI, CuPy through NCCL when chosen, else through the host)
    device_comm       NCCL via cupy.cuda.nccl for CuPy buffers: DeviceComm, TOPKATTN_DEVICE_COMM
                      (auto|nccl|mpi), use_local_device (see docs/distributed.md)
    context_parallel  exact top-k attention over keys sharded along S:
                      topk_attention, topk_attention_forward, topk_attention_backward
    data_parallel     toy training with the batch split over the ranks: train_data_parallel,
                      GradientReducer (one fused Allreduce a step), launched_world, abort
    sharded_decoding  decode over a cache sharded by position (each rank stores and searches
                      its positions; exact merge, log-sum-exp attention): shard_decoding,
                      ShardedMLA, ShardedAttention, ShardedMLACache, ShardedKVCache,
                      ShardedSelector, ShardedSelection, sharded_selector_factory, shard_positions
    head_parallel     MLA with the heads split over the ranks (model parallelism):
                      HeadParallelMLA, head_parallel, full_model_params, gather_model_grads,
                      head_parallel_grad_norm, clip_head_parallel_grad_norm

Run a script under ``mpiexec -n N python -m mpi4py script.py`` (or call
:func:`install_excepthook` first): then an exception on one rank ends the job instead of
leaving the other ranks waiting in a collective.  The set-up functions compare the settings
that must agree on every rank (ValueError on every rank naming them); per-step inputs
(tokens, batches) are not compared.  In context parallelism every rank passes the same queries
and its own slice of the keys and values (``key_offset``).
"""
from topkattn.distributed.comm import INSTALL_HINT, abort, install_excepthook, launched_world, require_mpi, world
from topkattn.distributed.context_parallel import topk_attention, topk_attention_backward, topk_attention_forward
from topkattn.distributed.data_parallel import (
    GradientReducer,
    PeerError,
    check_replicas,
    params_checksum,
    split_rows,
    train_data_parallel,
)
from topkattn.distributed.head_parallel import (
    HeadParallelMLA,
    clip_head_parallel_grad_norm,
    full_model_params,
    gather_model_grads,
    head_parallel,
    head_parallel_grad_norm,
)
from topkattn.distributed.sharded_cache import ShardedKVCache, ShardedMLACache, shard_positions
from topkattn.distributed.sharded_decoding import ShardedSelection, ShardedSelector, sharded_selector_factory
from topkattn.distributed.sharded_layers import ShardedAttention, ShardedMLA, shard_decoding

__all__ = ["GradientReducer", "HeadParallelMLA", "INSTALL_HINT", "PeerError", "ShardedAttention", "ShardedKVCache",
           "ShardedMLA", "ShardedMLACache", "ShardedSelection", "ShardedSelector", "abort",
           "check_replicas", "clip_head_parallel_grad_norm", "full_model_params", "gather_model_grads", "head_parallel",
           "head_parallel_grad_norm", "install_excepthook", "launched_world", "params_checksum", "require_mpi",
           "shard_decoding", "shard_positions", "sharded_selector_factory", "split_rows", "topk_attention",
           "topk_attention_backward", "topk_attention_forward", "train_data_parallel", "world"]
