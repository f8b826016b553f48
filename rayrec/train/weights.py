"""Saving, loading and snapshotting a model's weights, for dense (DDP) and TorchRec-sharded (DMP) models alike.

Dense: rank 0 writes ``model.pt`` / ``best_model.pt``. Sharded: every rank writes its own shards with
``torch.distributed.checkpoint`` into ``model/``, ``best_model/`` and ``fused_optim/`` (the fused optimizer's
state, e.g. row-wise Adagrad accumulators) of its own directory (Ray Train merges the
ranks' directories into one checkpoint), so no rank ever holds a full table; loading works at another world size.
The "best weights" of early stopping are kept in memory as a snapshot of this rank's pieces.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn


class DenseWeights:
    sharded = False

    def __init__(self, model: nn.Module, method: nn.Module | None = None) -> None:
        self.model = model
        self.method = method  # training-only parameters (DE experts): checkpointed for resume, never exported

    def snapshot(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save(self, d: str | Path, rank: int, best: dict | None) -> None:
        if rank == 0:
            torch.save(self.model.state_dict(), os.path.join(d, "model.pt"))
            if self.method is not None and len(self.method.state_dict()):
                torch.save(self.method.state_dict(), os.path.join(d, "method.pt"))
            if best is not None:
                torch.save(best, os.path.join(d, "best_model.pt"))

    def load(self, d: str | Path, device) -> dict | None:
        self.model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=device))
        m = os.path.join(d, "method.pt")
        if self.method is not None and os.path.exists(m):
            self.method.load_state_dict(torch.load(m, map_location=device))
        p = os.path.join(d, "best_model.pt")
        return torch.load(p, map_location="cpu") if os.path.exists(p) else None


class ShardedWeights:
    sharded = True

    def __init__(self, dmp: nn.Module) -> None:
        self.dmp = dmp

    def snapshot(self) -> dict:
        from rayrec.sharding import snapshot_local

        return snapshot_local(self.dmp)

    def restore(self, snap: dict) -> None:
        from rayrec.sharding import restore_local

        restore_local(self.dmp, snap)

    def num_parameters(self) -> int:  # global sizes, whatever this rank holds
        return sum(math.prod(v.shape) for v in self.dmp.state_dict().values())

    def save(self, d: str | Path, rank: int, best: dict | None) -> None:  # collective
        from rayrec.sharding.checkpoint import write_shards

        from rayrec.sharding.checkpoint import write_optimizer_shards

        write_shards(self.dmp, Path(d) / "model")
        write_optimizer_shards(self.dmp, Path(d) / "fused_optim")  # resume continues the Adagrad accumulators
        if best is not None:
            current = self.snapshot()
            self.restore(best)
            write_shards(self.dmp, Path(d) / "best_model")
            self.restore(current)

    def load(self, d: str | Path, device) -> dict | None:  # collective
        from rayrec.sharding.checkpoint import load_optimizer_shards, load_sharded

        best = None
        if (Path(d) / "best_model" / ".metadata").exists():
            load_sharded(self.dmp, Path(d) / "best_model")
            best = self.snapshot()
        load_sharded(self.dmp, Path(d) / "model")
        if (Path(d) / "fused_optim" / ".metadata").exists():
            load_optimizer_shards(self.dmp, Path(d) / "fused_optim")
        return best

    def item_row_shard(self):
        """This rank's rows of the row-wise item table, for distributed evaluation (collective): BPR's raw rows;
        NeuMF's :class:`~rayrec.models.neumf.SplitHead` keys of its GMF and MLP item rows, computed from the current
        MLP weights (call again after they change). None when the tables are not row-blocked alike."""
        from rayrec.eval.evaluate import RowShard
        from rayrec.sharding.plan import owned_row_block

        names = [n for n in ("item", "gmf_item", "mlp_item") if any(k.endswith(f"embeddings.{n}.weight")
                                                                     for k in self.dmp.state_dict())]
        try:
            blocks = [owned_row_block(self.dmp, n) for n in names]
        except (KeyError, ValueError):
            return None
        if names == ["item"]:
            return RowShard(*blocks[0])
        if names != ["gmf_item", "mlp_item"] or blocks[0][1] != blocks[1][1] or len(blocks[0][0]) != len(blocks[1][0]):
            return None
        from rayrec.models.neumf import SplitHead

        model = self.dmp.module
        model = getattr(model, "model", model)  # the training task wraps the model
        head = SplitHead(model.mlp, model.predict, model.dim)
        with torch.no_grad():
            keys = head.key(torch.cat([blocks[0][0], blocks[1][0]], dim=1).float())  # [I_r, 2D]
        return RowShard(keys, blocks[0][1], head, rebuild_each_eval=True)
