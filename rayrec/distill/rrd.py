r"""RRD — Relaxed Ranking Distillation (Kang et al., DE-RRD, CIKM 2020, §3.3; official code ``Utils/loss.py`` and
``Utils/dataset.py: URRD_sampling``).

The student learns the **order** of the teacher's top items. From the teacher's top-``N`` list of user ``u``
(``N = 500``, train items excluded, computed once by ``rank_teacher``), every epoch:

- ``K`` *interesting* items: ``K`` distinct ranks drawn with :math:`P(r) \propto e^{-r/T}` (``T = 10``), sorted
  ascending so the items keep the teacher's order — or, with ``interesting: top``, simply the teacher's first
  ``K`` items (the authors' later finding: no sampling works better; HetComp WWW'23);
- ``L`` *uninteresting* items: uniform over the items that are neither train items of ``u`` nor in its top-``N``.

With the student's scores :math:`a_{1..K}` (interesting, teacher order) and :math:`b_{1..L}` (uninteresting), the
relaxed Plackett-Luce likelihood keeps the uninteresting items below every interesting one without ordering them:

.. math::

    \log p(\pi_{1:K}) = \sum_{k=1}^{K}\Big[a_k - \log\Big(\sum_{l=k}^{K} e^{a_l} + \sum_{j=1}^{L} e^{b_j}\Big)\Big],
    \qquad \mathcal L_{RRD} = -\sum_{u \in \text{unique batch users}} \log p,
    \qquad \mathcal L = \mathcal L_{base} + \lambda_{RRD}\,\mathcal L_{RRD}

Defaults from the code: ``K = L = 40``, ``T = 10``, :math:`\lambda_{RRD} = 10^{-3}` (BPR). Computed with
log-sum-exp (stable for any score scale); lists are drawn for all users at once, without a users x items mask. For
a dot-product student on CPU (BPR, LightGCN: :meth:`~rayrec.models.base.Recommender.dot_tables`) the scores, the
loss and its gradient into the tables run in one native kernel (:func:`rayrec.kernels.rrd_nll`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, reduce_terms
from rayrec.distill.lists import Uninteresting, rank_discounted
from rayrec.distill.losses import relaxed_ranking_nll
from rayrec.errors import ConfigError
from rayrec.kernels import rrd_nll, uses_native_lists
from rayrec.models.base import Recommender


@dataclass
class RRDConfig:
    """RRD hyperparameters (paper symbols; defaults from the official code)."""

    K: int = 40  # interesting items per user
    L: int = 40  # uninteresting items per user
    T: float = 10.0  # rank-discount temperature of the interesting-item sampling
    lambda_rrd: float = 1e-3  # λ_RRD
    interesting: Literal["sampled", "top"] = "sampled"  # top: the teacher's first K items, no sampling

    def __post_init__(self) -> None:
        if self.K < 1 or self.L < 0:
            raise ConfigError(f"distill.rrd needs K >= 1 and L >= 0, got K={self.K}, L={self.L}")
        if self.T <= 0 or self.lambda_rrd < 0:
            raise ConfigError("distill.rrd needs T > 0 and lambda_rrd >= 0")


class RRD(DistillMethod):
    """Relaxed Ranking Distillation over the teacher's top-``N`` lists ``topn`` ``[U, N]`` (see module docstring)."""

    name = "rrd"
    needs_ranking = True

    def __init__(self, cfg: RRDConfig, *, topn: np.ndarray, train_indptr: np.ndarray, train_indices: np.ndarray,
                 num_items: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.topn = torch.as_tensor(topn, dtype=torch.int64)  # [U, N]
        U, N = self.topn.shape
        short = int((self.topn[:, cfg.K - 1] < 0).sum()) if N >= cfg.K else U
        if short:
            raise ConfigError(f"distill.rrd.K={cfg.K} but {short} users have fewer than K items in the teacher's "
                              f"top-{N}; lower K or rank more items")
        self.uninteresting = Uninteresting(train_indptr, train_indices, topn, num_items) if cfg.L else None
        self.inter = self.topn[:, : cfg.K].clone()  # [U, K]
        self.unint = torch.zeros(U, cfg.L, dtype=torch.int64)  # [U, L]
        self.lists = torch.cat([self.inter, self.unint], dim=1)  # [U, K + L] each user's list, interesting first

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        U, N = self.topn.shape
        c = self.cfg
        if c.interesting == "sampled":
            n_valid = int((self.topn >= 0).sum(1).min())  # every user has >= K (checked); sample within the valid prefix
            ranks = rank_discounted(U, min(N, n_valid), c.K, c.T, generator)  # [U, K] ascending
            self.inter = self.topn.gather(1, ranks)
        if self.uninteresting is not None:
            self.unint = self.uninteresting.sample(torch.arange(U), c.L, generator)
        self.lists = torch.cat([self.inter, self.unint], dim=1)

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, torch.Tensor]:
        if self.cfg.lambda_rrd == 0:
            return {}
        users = batch.uniq_users
        items = self.lists.index_select(0, users.cpu()).to(users.device)  # [U_b, K + L] (one gather, not two + cat)
        tables = student.dot_tables() if isinstance(student, Recommender) else None
        if tables is not None and uses_native_lists(*tables):  # CPU: gather, score, loss and scatter in one kernel
            nll = rrd_nll(*tables, users, items, self.cfg.K)  # [U_b]
        else:
            scores = student.score(users, items)  # [U_b, K + L]
            nll = relaxed_ranking_nll(scores[:, : self.cfg.K], scores[:, self.cfg.K:])  # [U_b]
        return {"kd/rrd": self.cfg.lambda_rrd * reduce_terms(nll, reduction)}
