"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes only its own shards.

A checkpoint directory holds DCP's ``.metadata`` plus one ``__<rank>_0.distcp`` per writing rank, and
``extra.json`` (rank 0) for non-tensor state. Loading reads the shards a rank needs for *its* current plan, so a
checkpoint written on 2 workers loads on 1 (or on 2 with another sharding type), and the reverse.

:func:`save_sharded` is atomic on a shared filesystem: all ranks write into ``.<name>.tmp`` beside the target,
then rank 0 renames it after a barrier. Inside Ray Train, write into a per-rank temporary directory and pass it to
``ray.train.report(checkpoint=...)`` instead: Ray merges the ranks' directories into one persisted checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from rayrec.errors import ArtifactError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def write_shards(dmp: nn.Module, directory: str | Path, extra: dict | None = None) -> None:
    """Write this rank's shards of ``dmp.state_dict()`` (and rank 0's ``extra``) into ``directory`` (collective)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(dmp.state_dict(), checkpoint_id=str(directory))
    if extra is not None and _rank() == 0:
        (directory / "extra.json").write_text(json.dumps(extra, indent=1))


def save_sharded(dmp: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Atomic sharded save to ``directory`` on a filesystem all ranks share (collective)."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    write_shards(dmp, tmp, extra)
    _barrier()
    if _rank() == 0:
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    _barrier()
    return directory


def load_sharded(dmp: nn.Module, directory: str | Path) -> dict | None:
    """Load a sharded checkpoint into ``dmp`` in place, whatever world size or plan wrote it (collective).
    Returns rank 0's ``extra`` (or None)."""
    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise ArtifactError(f"{directory} is not a sharded checkpoint (no .metadata)")
    sd = dmp.state_dict()
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    missing = sorted(k for k in sd if k not in saved)
    wrong = [f"{k}: checkpoint {tuple(saved[k].size)} vs model {tuple(v.shape)}" for k, v in sd.items()
             if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(v.shape)]
    if missing or wrong:
        raise ArtifactError(f"{directory}: checkpoint does not match the configured model ("
                            + "; ".join(wrong + ([f"missing {missing}"] if missing else []))
                            + "); check model.name / model.dim and the prepared data")
    dcp.load(sd, checkpoint_id=str(directory))
    extra = directory / "extra.json"
    return json.loads(extra.read_text()) if extra.exists() else None


def write_optimizer_shards(dmp: nn.Module, directory: str | Path) -> bool:
    """Write this rank's shards of the fused optimizer's state (row-wise Adagrad accumulators ...) with DCP
    (collective). False, writing nothing, when the optimizer keeps no state (EXACT_SGD)."""
    opt = getattr(dmp, "fused_optimizer", None)
    sd = opt.state_dict() if opt is not None else {"state": {}}
    if not any(sd["state"].values()):
        return False
    dcp.save(sd, checkpoint_id=str(directory))
    return True


def load_optimizer_shards(dmp: nn.Module, directory: str | Path) -> None:
    """Load fused optimizer state written by :func:`write_optimizer_shards`, at any world size (collective)."""
    sd = dmp.fused_optimizer.state_dict()
    dcp.load(sd, checkpoint_id=str(directory))
    dmp.fused_optimizer.load_state_dict(sd)


def export_dense(directory: str | Path, out: str | Path | None = None) -> dict:
    """Read a whole sharded checkpoint into one plain state dict in a single process (small teachers: tests,
    single-process tools); also ``torch.save`` it to ``out`` (atomically) when given. Keys as in training."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = Path(directory)
    if (directory / "model" / ".metadata").exists():
        directory = directory / "model"
    if not (directory / ".metadata").exists():
        raise FileNotFoundError(f"{directory} is not a sharded checkpoint (no .metadata)")
    target = Path(out) if out is not None else None
    tmp = (target.parent if target else directory.parent) / f".export-{os.getpid()}.pt"
    try:
        dcp_to_torch_save(str(directory), str(tmp))
        state = torch.load(tmp, map_location="cpu")
        if target is not None:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return state
