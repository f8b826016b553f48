"""A frozen sharded teacher inside the distillation workers.

:func:`load_frozen_teacher` builds the teacher's TorchRec model on the meta device, shards it over the workers'
process group like in training (any world size: DCP reshards on load), loads the checkpoint's ``model/`` shards,
and freezes it: ``eval()`` mode, a fused EXACT_SGD with learning rate 0 (fbgemm keeps no optimizer state for it),
every lookup under ``torch.no_grad()``; the dense leaf parameters (NeuMF's MLP) get ``requires_grad=False``
(sharded table views are not leaves and cannot be flagged, so the no-grad lookups are what keeps them frozen).

Every rank must call the lookups the same number of times with batches of its own (they are collectives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rayrec.models import build_model
from rayrec.sharding import shard_model
from rayrec.sharding.checkpoint import load_sharded


@dataclass(frozen=True)
class TeacherOutput:
    """What the teacher gives a distillation step (``B`` rows, ``C`` candidates, ``D_t`` teacher dims)."""

    user: dict[str, Tensor]  # name -> [B, D_t]
    item: dict[str, Tensor]  # name -> [B, C, D_t]
    scores: Tensor  # [B, C]


class FrozenTeacher(nn.Module):
    """``dmp``: the sharded teacher (``DistributedModelParallel`` over a ``TrainTask``), or a dense model (the
    ``dense`` sharding: the whole teacher in this worker, its lookups local)."""

    def __init__(self, dmp: nn.Module) -> None:
        super().__init__()
        self.dmp = dmp
        inner = getattr(dmp, "module", dmp)
        self.model = inner.model if hasattr(inner, "model") else inner
        self.dmp.eval()
        for p in self.dmp.parameters():
            if p.is_leaf:
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # stays in eval mode whatever the caller asks
        return super().train(False)

    @torch.no_grad()
    def answer(self, request):
        """Answer a distillation method's :class:`rayrec.distill.TeacherRequest` (collective: one lookup per
        requested field; every rank's method asks for the same fields)."""
        from rayrec.distill.base import TeacherAnswer

        out = TeacherAnswer()
        if request is None:
            return out
        if request.users is not None:
            out.user = self.model.user_repr(request.users)
        if request.items is not None:
            out.item = self.model.item_repr(request.items)
        if request.score_users is not None:
            out.scores = self.model.score(request.score_users, request.score_items)
        return out

    @torch.no_grad()
    def score_lists(self, items: Tensor, device: torch.device | str = "cpu", chunk_pairs: int = 1 << 18) -> Tensor:
        """The teacher's scores ``[U, C]`` of every user's list ``items`` ``[U, C]`` (row ``u``: user ``u``),
        identical on every rank (collective): rank ``r`` scores users ``r::W`` in chunks of about ``chunk_pairs``
        pairs (every rank runs the same number of lookups), then the rows are all-gathered."""
        from rayrec.distributed import all_gather_stack, all_reduce, world

        rank, W = world()
        U, C = items.shape
        mine = torch.arange(rank, U, W)  # [U_r]
        per = max(1, chunk_pairs // max(C, 1))
        n = int(all_reduce(torch.tensor([-(-len(mine) // per)]), torch.distributed.ReduceOp.MAX)[0])
        local = torch.zeros(-(-U // W), C)  # [ceil(U / W), C]
        for c in range(n):
            u = mine[c * per : (c + 1) * per]
            if len(u) == 0:  # lockstep padding: the lookups are collectives
                dummy = torch.zeros(1, dtype=torch.int64, device=device)
                self.model.score(dummy, dummy.view(1, 1).expand(1, C))
                continue
            local[c * per : c * per + len(u)] = self.model.score(u.to(device), items[u].to(device)).float().cpu()
        gathered = all_gather_stack(local)  # [W, ceil(U / W), C]
        out = torch.empty(U, C)
        for r in range(W):
            rows = torch.arange(r, U, W)
            out[rows] = gathered[r, : len(rows)]
        return out

    @torch.no_grad()
    def lookup(self, users: Tensor, items: Tensor) -> TeacherOutput:
        """Representations and scores for ``users`` ``[B]`` and candidates ``items`` ``[B, C]`` (collective)."""
        return TeacherOutput(
            user=self.model.user_repr(users),
            item=self.model.item_repr(items),
            scores=self.model.score(users, items),
        )


def load_frozen_teacher(checkpoint: str | Path, *, name: str, num_users: int, num_items: int, dim: int,
                        sharding_type: str = "row_wise", device: torch.device | None = None, layers: int = 3,
                        graph: tuple | None = None) -> FrozenTeacher:
    """Load a sharded teacher checkpoint (a Ray Train checkpoint directory holding ``model/``) frozen (collective).
    A LightGCN teacher also needs its train ``graph`` ``(users, items)`` and ``layers``.

    ``sharding_type="dense"``: every worker reads the whole checkpoint into a dense model of its own
    (:func:`rayrec.sharding.checkpoint.export_dense`), no TorchRec lookups. Only for teachers that fit each worker's
    memory: what a single GPU process without fbgemm-gpu can run (``benchmarks/train_speed.py``'s GPU figures)."""
    from rayrec.train.task import TrainTask

    ckpt = Path(checkpoint)
    shards = ckpt / "model" if (ckpt / "model" / ".metadata").exists() else ckpt
    if sharding_type == "dense":
        from rayrec.serve import dense_model_state
        from rayrec.sharding.checkpoint import export_dense

        model = build_model(name, num_users, num_items, dim, layers=layers, graph=graph)
        model.load_state_dict(dense_model_state(export_dense(shards), name))  # shapes checked here
        return FrozenTeacher(model.to(device or "cpu"))
    model = build_model(name, num_users, num_items, dim, sharded=True, layers=layers, graph=graph)
    # same module tree as in training (TrainTask -> model) so the checkpoint keys match
    dmp = shard_model(TrainTask(model), sharding_type=sharding_type, optimizer="exact_sgd", lr=0.0, device=device)
    load_sharded(dmp, shards)
    return FrozenTeacher(dmp)
