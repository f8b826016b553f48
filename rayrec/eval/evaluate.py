"""Evaluating a model on a prepared dataset: sampled (held-out item + N fixed negatives) and full ranking.

Users are sharded over ranks (``users[rank::world]``); each rank scores its users in chunks whose score block
fits ``eval.memory_budget_mb``, sums the per-user metric values, and the sums are all-reduced, so every rank
returns the same averages. Runs identically in a single process (no process group).

Keys: sampled ``<split>/H@K``, ``<split>/N@K``, ``<split>/M@K``; full ranking ``full/Recall@K``,
``full/NDCG@K``, ``full/HR@K`` on test and ``full_valid/...`` on valid (``../shared/docs/results.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rayrec.config import EvalConfig
from rayrec.data.splits import user_items_csr
from rayrec.eval.metrics import chunk_size_for, full_ranking_metrics, sampled_metrics, sampled_ranks
from rayrec.models.base import Recommender


@dataclass
class CSR:
    indptr: Tensor  # [U + 1]
    indices: Tensor  # [nnz]

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int) -> "CSR":
        indptr, indices = user_items_csr(users, items, num_users)
        return cls(torch.from_numpy(indptr), torch.from_numpy(np.ascontiguousarray(indices)))

    def degree(self) -> Tensor:
        return self.indptr[1:] - self.indptr[:-1]  # [U]

    def rows(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """(row index in the chunk, item) pairs of ``users`` ``[B]``, both ``[nnz_chunk]``."""
        start, end = self.indptr[users], self.indptr[users + 1]
        lens = end - start
        row = torch.repeat_interleave(torch.arange(len(users)), lens)
        offs = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        return row, self.indices[torch.repeat_interleave(start, lens) + offs]

    def padded(self, users: Tensor) -> Tensor:
        """Items of ``users`` ``[B]`` as ``[B, H]`` padded with -1."""
        row, items = self.rows(users)
        lens = self.degree()[users]
        h = int(lens.max()) if len(lens) else 0
        out = torch.full((len(users), max(h, 1)), -1, dtype=torch.int64)
        col = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        out[row, col] = items
        return out


@dataclass
class EvalData:
    """What evaluation needs from a prepared dataset, as tensors (built once per worker)."""

    num_users: int
    num_items: int
    train: CSR
    valid: CSR
    test: CSR
    negatives: Tensor | None  # [U, N] fixed sampled negatives (never interacted items)

    @classmethod
    def from_prepared(cls, pd) -> "EvalData":  # pd: rayrec.data.prepared.PreparedData
        U = pd.num_users
        neg = torch.from_numpy(np.ascontiguousarray(pd.negatives, dtype=np.int64)) if pd.negatives is not None else None
        return cls(
            num_users=U,
            num_items=pd.num_items,
            train=CSR.from_pairs(pd.train_user, pd.train_item, U),
            valid=CSR.from_pairs(pd.valid_user, pd.valid_item, U),
            test=CSR.from_pairs(pd.test_user, pd.test_item, U),
            negatives=neg,
        )


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _allreduce(vec: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        vec = vec.clone()
        dist.all_reduce(vec)
    return vec


@torch.no_grad()
def evaluate(
    model: Recommender,
    data: EvalData,
    split: str,
    cfg: EvalConfig,
    *,
    sampled: bool | None = None,
    full: bool | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Average metrics of ``model`` on ``split`` ("valid" or "test") over this rank's users, all-reduced."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    sampled = cfg.sampled if sampled is None else sampled
    full = cfg.full if full is None else full
    truth_csr = data.valid if split == "valid" else data.test
    rank, world = _dist_world()
    was_training = model.training
    model.eval()
    has_truth = truth_csr.degree() > 0
    all_users = torch.arange(data.num_users)
    out: dict[str, float] = {}

    if sampled:
        if data.negatives is None:
            raise ValueError("sampled evaluation needs fixed negatives (data.num_eval_negatives > 0)")
        if int(truth_csr.degree().max()) > 1:
            raise ValueError(f"sampled evaluation needs exactly one held-out {split} item per user (leave-one-out)")
        users = all_users[has_truth][rank::world]
        N = data.negatives.shape[1]
        per_user_bytes = (N + 1) * max(model.dim, 1) * 4 * 4
        chunk = max(1, cfg.memory_budget_mb * 1024 * 1024 // per_user_bytes)
        keys = [f"{m}@{k}" for k in cfg.sampled_ks for m in ("H", "N", "M")]
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        for s in range(0, len(users), chunk):
            u = users[s : s + chunk]  # [B]
            pos = truth_csr.indices[truth_csr.indptr[u]]  # [B]
            cand = torch.cat([pos.unsqueeze(1), data.negatives[u]], dim=1)  # [B, 1 + N]
            scores = model.score(u.to(device), cand.to(device)).float().cpu()  # [B, 1 + N]
            m = sampled_metrics(sampled_ranks(scores[:, 0], scores[:, 1:]), cfg.sampled_ks)
            sums[:-1] += torch.stack([m[k].double().sum() for k in keys])
            sums[-1] += len(u)
        sums = _allreduce(sums)
        for i, k in enumerate(keys):
            out[f"{split}/{k}"] = float(sums[i] / sums[-1]) if sums[-1] > 0 else float("nan")

    if full:
        include = torch.ones_like(has_truth) if cfg.users_without_truth == "zero" else has_truth
        users = all_users[include][rank::world]
        chunk = chunk_size_for(data.num_items, cfg.memory_budget_mb)
        keys = [f"{m}@{k}" for k in cfg.full_ks for m in ("Recall", "NDCG", "HR")]
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        mask_csrs = [data.train] + ([data.valid] if split == "test" and cfg.mask_valid_when_testing else [])
        for s in range(0, len(users), chunk):
            u = users[s : s + chunk]  # [B]
            scores = model.score_all(u.to(device)).float().cpu()  # [B, I]
            mask = torch.zeros(scores.shape, dtype=torch.bool)  # [B, I]
            for c in mask_csrs:
                row, items = c.rows(u)
                mask[row, items] = True
            m = full_ranking_metrics(scores, mask, truth_csr.padded(u), cfg.full_ks)
            vals = torch.stack([torch.nan_to_num(m[k].double(), nan=0.0).sum() for k in keys])
            sums[:-1] += vals
            sums[-1] += len(u)
        sums = _allreduce(sums)
        prefix = "full" if split == "test" else "full_valid"
        for i, k in enumerate(keys):
            out[f"{prefix}/{k}"] = float(sums[i] / sums[-1]) if sums[-1] > 0 else float("nan")

    model.train(was_training)
    return out
