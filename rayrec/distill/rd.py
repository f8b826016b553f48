r"""RD — Ranking Distillation (Tang & Wang, "Ranking Distillation: Learning Compact Ranking Models With High
Performance for Recommender System", KDD 2018, eq. 3-5), the first baseline of DE-RRD's Table 2.

The teacher's top-``K`` items of user ``u`` (:math:`\pi_1..\pi_K`, train items excluded) are treated as extra,
weighted positives of the student:

.. math::

    \mathcal L_{RD} = -\sum_{u \in \text{unique batch users}} \sum_{r=1}^{K} w_r \log \sigma(\hat y_{u,\pi_r}),
    \qquad w_r = \frac{e^{-r/\mu}}{\sum_{r'} e^{-r'/\mu}},
    \qquad \mathcal L = \mathcal L_{base} + \lambda_{RD}\,\mathcal L_{RD}

Only RD's *position importance* weighting :math:`w^a_r \propto e^{-r/\mu}` is implemented; its *dynamic*
(ranking-discrepancy) weighting, which needs the student's rank of each item among all items, is left out
(documented choice). Defaults (ours, to be tuned: the DE-RRD paper does not list RD's): ``K = 10``, ``mu = 10``,
:math:`\lambda_{RD} = 0.1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, reduce_terms
from rayrec.distill.losses import weighted_log_sigmoid_nll
from rayrec.errors import ConfigError


@dataclass
class RDConfig:
    K: int = 10  # teacher's top items used per user
    mu: float = 10.0  # position-importance temperature
    lambda_rd: float = 0.1  # λ_RD

    def __post_init__(self) -> None:
        if self.K < 1 or self.mu <= 0 or self.lambda_rd < 0:
            raise ConfigError("distill.rd needs K >= 1, mu > 0, lambda_rd >= 0")


class RD(DistillMethod):
    name = "rd"
    needs_ranking = True

    def __init__(self, cfg: RDConfig, *, topn: np.ndarray) -> None:
        super().__init__()
        self.cfg = cfg
        self.top = torch.as_tensor(topn[:, : cfg.K], dtype=torch.int64)  # [U, K]
        w = torch.exp(-torch.arange(1, cfg.K + 1, dtype=torch.float32) / cfg.mu)
        self.register_buffer("weights", w / w.sum(), persistent=False)  # [K]

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, torch.Tensor]:
        users = batch.uniq_users
        items = self.top[users.cpu()].to(users.device)  # [U_b, K] (-1 pads a short list)
        valid = items >= 0
        scores = student.score(users, items.clamp(min=0))  # [U_b, K]
        nll = weighted_log_sigmoid_nll(scores, self.weights * valid)  # [U_b]
        return {"kd/rd": self.cfg.lambda_rd * reduce_terms(nll, reduction)}
