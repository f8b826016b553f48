"""Plan and wrap a model whose tables are TorchRec ``EmbeddingCollection`` s.

``shard_model`` asks ``EmbeddingShardingPlanner`` for a plan in which every table uses the configured sharding type
(``row_wise`` default; ``table_wise``, ``column_wise``, ``data_parallel``) and wraps the model in
``DistributedModelParallel`` over the default process group (the one Ray Train creates). Non-data-parallel tables
use the ``fused`` kernel with a fused optimizer applied in backward (on CPU fbgemm supports EXACT_SGD,
EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD; Adam needs CUDA); data-parallel tables and dense layers are ordinary
parameters, DDP-averaged, for the dense optimizer. TorchRec averages embedding gradients over ranks like DDP.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

SHARDING_TYPES = ("row_wise", "table_wise", "column_wise", "data_parallel")
FUSED_OPTIMIZERS = ("exact_sgd", "exact_adagrad", "exact_rowwise_adagrad", "adam")
_CPU_OK = {"exact_sgd", "exact_adagrad", "exact_rowwise_adagrad"}
# fbgemm's SGD and (element-wise) Adagrad kernels take no weight decay: a value would be silently ignored
NO_WEIGHT_DECAY = {"exact_sgd", "exact_adagrad"}


def _tables(model: nn.Module) -> list[str]:
    from torchrec import EmbeddingCollection

    names = []
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            names += [t.name for t in m.embedding_configs()]
    return names


def shard_model(
    model: nn.Module,
    *,
    sharding_type: str = "row_wise",
    optimizer: str = "exact_rowwise_adagrad",
    lr: float = 0.01,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    device: torch.device | None = None,
    pg: dist.ProcessGroup | None = None,
):
    """Shard ``model``'s embedding tables over ``pg`` (default: the world group) and return the DMP."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig

    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding type {sharding_type!r} is not one of {SHARDING_TYPES}")
    if optimizer not in FUSED_OPTIMIZERS:
        raise ValueError(f"fused optimizer {optimizer!r} is not one of {FUSED_OPTIMIZERS}")
    device = device or torch.device("cpu")
    if device.type == "cpu" and optimizer not in _CPU_OK:
        raise ValueError(f"fused optimizer {optimizer!r} needs CUDA; on CPU use one of {sorted(_CPU_OK)}")
    if weight_decay and optimizer in NO_WEIGHT_DECAY:
        raise ValueError(f"fused optimizer {optimizer!r} has no weight decay in fbgemm; use exact_rowwise_adagrad "
                         "(L2 on the rows a batch touches) or weight_decay=0")
    pg = pg or dist.GroupMember.WORLD
    world = dist.get_world_size(pg)
    fused = {"optimizer": getattr(EmbOptimType, optimizer.upper()), "learning_rate": lr, "eps": eps}
    if weight_decay:  # L2 on the rows a batch touches (fbgemm applies it in the fused update)
        from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

        fused.update(weight_decay=weight_decay, weight_decay_mode=WeightDecayMode.L2)
    sharder = EmbeddingCollectionSharder(fused_params=fused)
    kernel = "dense" if sharding_type == "data_parallel" else "fused"
    constraints = {t: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[kernel]) for t in _tables(model)}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=local_world), kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(0.1))
    plan = planner.collective_plan(model, [sharder], pg)
    for m in model.modules():  # TorchRec 1.8's CPU data-parallel kernel reads one id per row only (models/sharded)
        if hasattr(m, "one_id_per_row"):
            m.one_id_per_row = sharding_type == "data_parallel"
    return DistributedModelParallel(model, plan=plan, sharders=[sharder], device=device, env=None)


def _local_shards(value):
    """``(offsets, tensor)`` pairs of this rank's pieces of a state-dict value (ShardedTensor, DTensor or dense)."""
    if hasattr(value, "local_shards"):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    if hasattr(value, "to_local"):  # DTensor (later TorchRec versions)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return [(tuple(offsets), value.to_local())]
    return [((0,) * value.dim(), value)]


def owned_row_block(dmp: nn.Module, table: str) -> tuple[torch.Tensor, int]:
    """:func:`local_row_block` for computations over "this rank's rows" (distributed ranking, evaluation): when
    the ranks' blocks overlap (a replicated ``data_parallel`` table: every rank holds every row) rank 0 alone owns
    them and the other ranks get an empty block, so each row counts once (collective: one all-gather)."""
    from rayrec.distributed import all_gather_stack, world

    rows, offset = local_row_block(dmp, table)
    ends = all_gather_stack(torch.tensor([offset, offset + rows.shape[0]]))  # [W, 2]
    if int((ends[:, 1] - ends[:, 0]).sum()) > int(ends[:, 1].max() - ends[:, 0].min()) and world()[0] != 0:
        rows = rows[:0]
    return rows, offset


@torch.no_grad()
def load_dense_state_dict(dmp: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into this rank's shards, in place. Keys as in ``dmp.state_dict()``."""
    sd = dmp.state_dict()
    missing = [k for k in sd if k not in dense]
    if missing:
        raise KeyError(f"dense state dict lacks {missing}")
    for k, v in sd.items():
        for offsets, t in _local_shards(v):
            index = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
            t.copy_(dense[k][index])


@torch.no_grad()
def dense_state_dict(dmp: nn.Module) -> dict[str, torch.Tensor]:
    """Gather every table and dense parameter into plain tensors on every rank (small models only)."""
    return {k: gather_full(v) for k, v in dmp.state_dict().items()}


@torch.no_grad()
def gather_full(v) -> torch.Tensor:
    """A ShardedTensor (or plain tensor) as one full tensor on every rank (collective for sharded values)."""
    full = torch.zeros(v.shape, dtype=v.dtype)
    for offsets, t in _local_shards(v):
        index = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
        full[index] = t.detach().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1 and hasattr(v, "local_shards"):
        dist.all_reduce(full)  # shards are disjoint: the sum is the full tensor
    return full


@torch.no_grad()
def snapshot_local(dmp: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of this rank's pieces of every state-dict entry (a sharded "best weights" kept in memory)."""
    return {k: [t.detach().clone() for _, t in _local_shards(v)] for k, v in dmp.state_dict().items()}


@torch.no_grad()
def restore_local(dmp: nn.Module, snap: dict[str, list[torch.Tensor]]) -> None:
    """Write a :func:`snapshot_local` back into the live shards, in place."""
    for k, v in dmp.state_dict().items():
        for (_, t), saved in zip(_local_shards(v), snap[k]):
            t.copy_(saved)


def local_row_block(dmp: nn.Module, table: str) -> tuple[torch.Tensor, int]:
    """This rank's contiguous rows ``[offset, offset + n)`` of a row-wise sharded table: ``(rows [n, D], offset)``.

    ``table`` is the table's name (``item``, ``gmf_user`` ...). Raises ``ValueError`` when the table is not
    row-wise sharded (ranking and neighbours load the teacher row-wise whatever it was trained with: DCP reshards).
    """
    suffix = f"embeddings.{table}.weight"
    for k, v in dmp.state_dict().items():
        if k.endswith(suffix):
            shards = _local_shards(v)
            if not shards:  # a rank may hold no rows of a small table
                return torch.zeros(0, v.shape[1], dtype=v.dtype), 0
            if len(shards) != 1 or shards[0][1].shape[1] != v.shape[1]:
                raise ValueError(f"table {table!r} is not row-wise sharded on this rank ({len(shards)} pieces)")
            offsets, t = shards[0]
            return t.detach(), int(offsets[0])
    raise KeyError(f"no table {table!r} in the model (state dict keys end in {suffix!r}?)")
