"""Small collective helpers that also work in a single process (no process group: identity)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ensure_process_group(backend: str = "gloo") -> bool:
    """A 1-rank process group (``gloo``; ``nccl`` for a teacher on CUDA) when none exists (TorchRec's sharded
    modules need one even alone): plain single-process runs load the sharded teacher through it. True when this
    call created it."""
    if not dist.is_available() or dist.is_initialized():
        return False
    import os

    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    # an in-process store: one rank needs no rendezvous, and no TCP port that another process could take first
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of ``t`` over all ranks (``t`` itself is left unchanged)."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=op)
    return t


def all_gather_stack(t: Tensor) -> Tensor:
    """``t`` ``[n, ...]`` (same shape on every rank) -> ``[W, n, ...]``."""
    if world()[1] == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)
