"""Evaluating a model on a prepared dataset: sampled (held-out item + N fixed negatives) and full ranking.

Users are sharded over ranks (``users[rank::world]``); each rank scores its users in chunks whose score block
fits ``eval.memory_budget_mb``, sums the per-user metric values, and the sums are all-reduced, so every rank
returns the same averages. Runs identically in a single process (no process group).

Keys: sampled ``<split>/H@K``, ``<split>/N@K``, ``<split>/M@K``; full ranking ``full/Recall@K``,
``full/NDCG@K``, ``full/HR@K`` on test and ``full_valid/...`` on valid (``../shared/docs/results.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rayrec.config import EvalConfig
from rayrec.data.splits import user_items_csr
from rayrec.distributed import all_gather_stack as _gather
from rayrec.distributed import all_reduce as _allreduce
from rayrec.distributed import world as _dist_world
from rayrec.eval.metrics import (
    HeldoutRanker,
    chunk_size_for,
    full_metrics_from_positions,
    positions_from_top,
    sampled_metrics,
    sampled_ranks,
    select_csr_rows,
)
from rayrec.models.base import Recommender, shared_forward
from rayrec.topk import block_topk, dot_scores

# Full ranking on a CPU: the budget of one chunk's score block is at most this many MiB, whatever
# eval.memory_budget_mb allows, so the scores (4 MiB, with the 4x overhead of chunk_size_for) stay in the last-level
# cache between the GEMM and the ranking passes. CiteULike-t (5,220 users x 25,182 items, d=20, test split, one
# thread): with the checks done once per evaluation (EvalData.ranker), blocks of 8 / 16 / 32 MiB took 0.26-0.28 /
# 0.26-0.27 / 0.32-0.33 s beside three training streams, where the former per-block checks made 32 MiB the best
# (0.40 s; 16 MiB 0.46 s). A larger block goes out to main memory and back (256 MiB: 0.68 s before); a smaller one
# pays the per-block ops more often (2 MiB: 0.49 s beside one stream).
CPU_FULL_BLOCK_MB = 16


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
        dev = self.indptr.device
        row = torch.repeat_interleave(torch.arange(len(users), device=dev), lens)
        offs = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
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
    _rankers: dict = field(default_factory=dict, repr=False, compare=False)  # EvalData.ranker's, by users/split

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

    def ranker(self, split: str, users: Tensor, mask_csrs: list[CSR], device) -> HeldoutRanker:
        """The checked held-out items and exclusions (``mask_csrs``: train, and valid when testing) of ``users``
        ``[B]`` for full ranking on ``split``: built once, then reused by every evaluation with the same users,
        exclusions and device (the last one per split, exclusion count and device is kept)."""
        key = (split, len(mask_csrs), str(torch.device(device)))
        cached = self._rankers.get(key)
        if cached is None or not torch.equal(cached[0], users):
            truth_csr = self.valid if split == "valid" else self.test
            rows, items = zip(*(cs.rows(users) for cs in mask_csrs))
            row, item = torch.cat(rows), torch.cat(items)
            indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(row, minlength=len(users)).cumsum(0)])
            dev = torch.device(device)
            cached = self._rankers[key] = (users.clone(), HeldoutRanker(
                self.num_items, select_csr_rows(truth_csr.indptr, truth_csr.indices, users),
                (indptr.to(dev), item[torch.argsort(row, stable=True)].to(dev)), device=dev, num_rows=len(users)))
        return cached[1]


DOT_BLOCK_USERS = 8192  # users per block of the fused full ranking (_dot_ranking_tables)


def _dot_ranking_tables(model) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(U [Nu, D], V [I, D], V^T [D, I])`` float32 on CPU when ``model`` scores by the dot product of two tables
    (:meth:`~rayrec.models.base.Recommender.dot_tables`: BPR, LightGCN's propagated layers) and the native kernels
    are built: the full ranking then counts each block's positions fused with its scoring
    (:meth:`~rayrec.eval.metrics.HeldoutRanker.positions_dot`), without a ``[B, I]`` score block. Else ``None``."""
    from rayrec.kernels import native

    if native() is None or not isinstance(model, Recommender):
        return None
    with torch.no_grad():
        tables = model.dot_tables()
    if tables is None:
        return None
    U, V = (t.detach() for t in tables)
    if U.device.type != "cpu" or V.device.type != "cpu" or U.dtype != torch.float32 or V.dtype != torch.float32:
        return None
    return U, V.contiguous(), V.T.contiguous()


def _num_chunks(n: int, chunk: int, lockstep: bool) -> int:
    """Chunks this rank runs; with ``lockstep`` (sharded models: every lookup is a collective) the max over ranks."""
    mine = -(-n // chunk)
    return int(_allreduce(torch.tensor([mine]), dist.ReduceOp.MAX)[0]) if lockstep else mine


class DotRows:
    """How a row-sharded dot-product model (BPR) scores its item rows: query = the user's embedding."""

    def query_repr(self, reprs: dict[str, Tensor]) -> Tensor:
        return reprs["emb"]  # [B, D]

    def block(self, q: Tensor, k: Tensor) -> Tensor:
        return dot_scores(q, k.T.to(q.dtype))  # [Q, I_r]

    def pairs(self, q: Tensor, k: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        x = k.to(q.dtype).index_select(0, ki)  # [n, D]
        x *= q.index_select(0, qi)
        return x.sum(dim=1)  # [n]


@dataclass
class RowShard:
    """This rank's rows ``[offset, offset + I_r)`` of a row-wise sharded item table, as keys ``[I_r, D_k]`` for
    ``scorer``: the raw rows for a dot-product model (BPR, :class:`DotRows`), NeuMF's
    :class:`rayrec.models.neumf.SplitHead` keys (recomputed from the current MLP weights for each evaluation)."""

    rows: Tensor
    offset: int
    scorer: Any = field(default_factory=DotRows)  # query_repr / block / pairs (see DotRows)
    # the keys derive from dense weights that training changes (NeuMF's MLP): rebuild them for every evaluation
    rebuild_each_eval: bool = False


def _sharded_positions(q: Tensor, excl: tuple[Tensor, Tensor], truth: Tensor, th: Tensor, shard: RowShard,
                       kmax: int) -> Tensor:
    """Pessimistic held-out positions for this rank's users against a row-sharded item table (collective).

    ``q`` ``[B, D]`` user vectors, ``excl`` (row, item) pairs never ranked (train, valid when testing), ``truth``
    ``[B, H]`` held-out ids (-1 pad), ``th`` ``[B, H]`` their scores. Every rank gathers all ranks' queries, keeps
    the top-``kmax`` candidate scores of *its* rows, and the per-rank lists are merged; no rank sees the full
    table or the full ``[users, items]`` score matrix.
    """
    rank, W = _dist_world()
    B, H = truth.shape
    # pad every rank's block to the same [B, H] (all_gather needs equal shapes)
    bh = _allreduce(torch.tensor([B, H]), dist.ReduceOp.MAX)
    Bm, Hm = int(bh[0]), int(bh[1])
    qp = torch.zeros(Bm, q.shape[1], dtype=q.dtype)
    qp[:B] = q
    tp = torch.full((Bm, Hm), -1, dtype=torch.int64)
    tp[:B, :H] = truth
    Q = _gather(qp).reshape(W * Bm, -1)  # [W·B, D]
    T = _gather(tp).reshape(W * Bm, Hm)  # [W·B, H]
    # exclusion pairs travel as (row in the gathered block, item); pad to a common length with -1
    row, item = excl
    n = _allreduce(torch.tensor([len(row)]), dist.ReduceOp.MAX)
    ep = torch.full((2, int(n[0])), -1, dtype=torch.int64)
    ep[0, : len(row)] = row + rank * Bm
    ep[1, : len(row)] = item
    E = _gather(ep).permute(1, 0, 2).reshape(2, -1)
    E = E[:, E[0] >= 0]

    I_r, off = shard.rows.shape[0], shard.offset
    s = shard.scorer.block(Q, shard.rows)  # [W·B, I_r]
    s = torch.where(torch.isnan(s), torch.inf, s)  # NaN candidates rank above everything
    drop = torch.zeros_like(s, dtype=torch.bool)
    loc = (E[1] >= off) & (E[1] < off + I_r)
    drop[E[0, loc], E[1, loc] - off] = True
    r, c = torch.nonzero(T >= 0, as_tuple=True)
    loc = (T[r, c] >= off) & (T[r, c] < off + I_r)
    drop[r[loc], T[r[loc], c[loc]] - off] = True
    n_cand_local = I_r - drop.sum(dim=1)  # [W·B]
    s.masked_fill_(drop, -torch.inf)
    L = min(kmax, I_r)
    part = torch.full((W * Bm, kmax), -torch.inf, dtype=s.dtype)
    if L > 0:
        part[:, :L] = block_topk(s, L)[0]  # unsorted: the merge sorts
    parts = _gather(part)[:, rank * Bm : rank * Bm + B]  # [W, B, kmax] every rank's best rows for my users
    n_cand = _gather(n_cand_local)[:, rank * Bm : rank * Bm + B].sum(dim=0)  # [B]
    merged = torch.topk(parts.permute(1, 0, 2).reshape(B, -1), min(kmax, W * kmax), dim=1).values  # [B, kmax]
    th = torch.where(torch.isnan(th), -torch.inf, th).masked_fill(truth < 0, torch.nan)
    return positions_from_top(merged, n_cand, th, kmax)


def _sharded_candidate_scores(q: Tensor, cand: Tensor, shard: RowShard) -> Tensor:
    """Scores ``[B, C]`` of this rank's users (queries ``q`` ``[B, D_q]``, see :class:`RowShard`) for their
    candidates ``cand`` ``[B, C]`` against a row-sharded item table (collective). Every rank gathers all ranks'
    queries and candidate ids, scores the candidates among *its* rows (0 elsewhere), and the partial scores are
    summed over ranks: each candidate row lives on exactly one rank. Moves ``W·B·(D_q + 2C)`` numbers instead of
    looking up ``B·C`` item rows through the sharded tables (and, for NeuMF, runs the MLP's first layer once per
    user and once per item instead of once per pair)."""
    rank, W = _dist_world()
    B, C = cand.shape
    Bm = int(_allreduce(torch.tensor([B]), dist.ReduceOp.MAX)[0])
    qp = torch.zeros(Bm, shard.rows.shape[1], dtype=torch.float32)
    qp[:B] = q
    cp = torch.full((Bm, C), -1, dtype=torch.int64)
    cp[:B] = cand
    Q, Cg = _gather(qp), _gather(cp)  # [W, Bm, D_q], [W, Bm, C]
    rows, off = shard.rows, shard.offset
    I_r, D = rows.shape
    local = (Cg >= off) & (Cg < off + I_r)  # [W, Bm, C]
    s = torch.zeros(W, Bm, C, dtype=torch.float32)
    w, b, c = torch.nonzero(local, as_tuple=True)
    if isinstance(shard.scorer, DotRows) and I_r <= 2 * C * D:
        # every query against all local rows in one GEMM, then the candidates picked out: cheaper than gathering
        # ~Bm·C rows of D floats while the block of rows is small
        full = dot_scores(Q.reshape(W * Bm, D), rows.float().T)  # [W·Bm, I_r]
        s[w, b, c] = full[w * Bm + b, Cg[w, b, c] - off]
    else:
        s[w, b, c] = shard.scorer.pairs(Q.reshape(W * Bm, -1), rows.float(), w * Bm + b, Cg[w, b, c] - off)
    return _allreduce(s)[rank, :B]  # [B, C]


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
    shard: RowShard | None = None,
    lockstep: bool = False,
) -> dict[str, float]:
    """Average metrics of ``model`` on ``split`` ("valid" or "test") over this rank's users, all-reduced.

    A model whose tables are sharded (``shard`` given: this rank's rows of the row-wise item table) is evaluated in
    lockstep (every rank runs the same number of lookups) and ranked fully without gathering the item table;
    ``lockstep`` alone (any sharded model) keeps the sampled protocol's lookups matched across ranks.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    with shared_forward(model):  # fixed weights: LightGCN propagates once for every chunk
        return _evaluate(model, data, split, cfg, sampled, full, device, shard, lockstep)


def _evaluate(model, data: EvalData, split: str, cfg: EvalConfig, sampled: bool | None, full: bool | None,
              device, shard: RowShard | None, lockstep: bool) -> dict[str, float]:
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
        # a row-sharded dot-product model: candidates scored on the rank holding their rows
        by_rows = shard is not None and getattr(model, "shard_rows", False)
        # a dense model that scores through per-item keys (NeuMF): the keys once, then O(D) per candidate
        row_scorer = getattr(model, "row_scorer", None)
        local = row_scorer() if shard is None and row_scorer is not None else None
        for c in range(_num_chunks(len(users), chunk, lockstep)):
            u = users[c * chunk : (c + 1) * chunk]  # [B]
            if len(u) == 0:  # lockstep padding: dummy collectives keep the ranks matched
                dummy = torch.zeros(1, dtype=torch.int64, device=device)
                if by_rows:
                    model.user_repr(dummy)
                    _sharded_candidate_scores(torch.zeros(0, shard.rows.shape[1]), torch.zeros(0, N + 1, dtype=torch.int64),
                                              shard)
                else:
                    model.score(dummy, dummy.view(1, 1))
                continue
            pos = truth_csr.indices[truth_csr.indptr[u]]  # [B]
            cand = torch.cat([pos.unsqueeze(1), data.negatives[u]], dim=1)  # [B, 1 + N]
            if by_rows:
                q = shard.scorer.query_repr(model.user_repr(u.to(device))).float().cpu()  # [B, D_q]
                scores = _sharded_candidate_scores(q, cand, shard)
            elif local is not None:
                scorer, item_keys = local  # [I, D_k]
                q = scorer.query_repr(model.user_repr(u.to(device)))  # [B, D_q]
                rows = torch.arange(len(u), device=q.device).repeat_interleave(cand.shape[1])
                scores = scorer.pairs(q, item_keys, rows, cand.reshape(-1).to(q.device)).view(cand.shape).float().cpu()
            else:
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
        on_cpu = torch.device(device).type == "cpu" and (shard is None or shard.rows.device.type == "cpu")
        chunk = chunk_size_for(data.num_items, min(cfg.memory_budget_mb, CPU_FULL_BLOCK_MB) if on_cpu
                               else cfg.memory_budget_mb)
        keys = [f"{m}@{k}" for k in cfg.full_ks for m in ("Recall", "NDCG", "HR")]
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        mask_csrs = [data.train] + ([data.valid] if split == "test" and cfg.mask_valid_when_testing else [])
        if lockstep and shard is None:
            raise ValueError("full ranking of a sharded model needs its row-wise item table shard (BPR, row_wise)")
        kmax = max(cfg.full_ks)
        # a model scored here: the exclusions and held-out items checked once, then every block ranked against them
        ranker = None if shard is not None else data.ranker(split, users, mask_csrs, device)
        # a dot-product model on CPU: the user rows and the item table, ranked by the fused count; no score block,
        # so the blocks are only as small as the count's own bookkeeping wants (5,220 users: 32 blocks cost ~25 ms
        # of small ops against ~48 ms of counting)
        dot = _dot_ranking_tables(model) if shard is None and on_cpu else None
        if dot is not None:
            chunk = max(chunk, DOT_BLOCK_USERS)
        by_width: dict[int, list[tuple[Tensor, Tensor]]] = {}  # blocks' (positions, valid) [B, H] by H
        for c in range(_num_chunks(len(users), chunk, lockstep)):
            u = users[c * chunk : (c + 1) * chunk]  # [B]
            if shard is not None:  # row-sharded table: distributed positions, same pessimistic rule
                truth = truth_csr.padded(u)  # [B, H]
                q = (shard.scorer.query_repr(model.user_repr(u.to(device))).float().cpu() if len(u)
                     else torch.zeros(0, shard.rows.shape[1]))
                th = (model.score(u.to(device), truth.clamp(min=0).to(device)).float().cpu() if len(u)
                      else torch.zeros(0, truth.shape[1]))
                if len(u) == 0:  # lockstep padding: match the two lookups of the other ranks
                    dummy = torch.zeros(1, dtype=torch.int64, device=device)
                    model.user_repr(dummy), model.score(dummy, dummy.view(1, 1))
                pairs = [cs.rows(u) for cs in mask_csrs]
                excl = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
                pos = _sharded_positions(q, excl, truth, th, shard, kmax)
                if len(u) == 0:
                    continue
                m = full_metrics_from_positions(pos, truth >= 0, cfg.full_ks)
                sums[:-1] += torch.stack([torch.nan_to_num(m[k].double(), nan=0.0).sum() for k in keys]).cpu()
                sums[-1] += len(u)
            elif len(u):
                # [B, I] ranked where it was scored: on a GPU, copying the block to the host and counting there on
                # one thread made the full evaluation 1.7x a student epoch (H100, CiteULike)
                if dot is not None:
                    pos, valid = ranker.positions_dot(dot[0].index_select(0, u), dot[1], dot[2], c * chunk,
                                                      kmax)  # [B, H]
                else:
                    scores = model.score_all(u.to(device)).float()
                    pos, valid = ranker.positions(scores, c * chunk, kmax)  # [B, H]
                    del scores
                by_width.setdefault(pos.shape[1], []).append((pos, valid))
        for blocks in by_width.values():  # the metrics once per width (leave-one-out: once)
            m = full_metrics_from_positions(torch.cat([p for p, _ in blocks]), torch.cat([v for _, v in blocks]),
                                            cfg.full_ks)
            sums[:-1] += torch.stack([torch.nan_to_num(m[k].double(), nan=0.0).sum() for k in keys]).cpu()
            sums[-1] += sum(len(p) for p, _ in blocks)
        sums = _allreduce(sums)
        prefix = "full" if split == "test" else "full_valid"
        for i, k in enumerate(keys):
            out[f"{prefix}/{k}"] = float(sums[i] / sums[-1]) if sums[-1] > 0 else float("nan")

    model.train(was_training)
    return out
