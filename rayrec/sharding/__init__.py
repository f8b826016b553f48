"""Sharding TorchRec models across workers with ``DistributedModelParallel`` (CPU/gloo and GPU/nccl)."""

from rayrec.sharding.plan import (
    FUSED_OPTIMIZERS,
    SHARDING_TYPES,
    dense_state_dict,
    load_dense_state_dict,
    local_row_block,
    restore_local,
    shard_model,
    snapshot_local,
)

__all__ = [
    "FUSED_OPTIMIZERS", "SHARDING_TYPES", "dense_state_dict", "load_dense_state_dict", "local_row_block", "restore_local", "shard_model",
    "snapshot_local",
]
