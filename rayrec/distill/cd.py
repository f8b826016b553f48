r"""CD — Collaborative Distillation (Lee, Choi, Lee & Lee, "Collaborative Distillation for Top-N
Recommendation", ICDM 2019), the second baseline of DE-RRD's Table 2.

Every epoch, ``k`` unobserved items per user are drawn from the teacher's top-``N`` list with rank-discounted
probability :math:`P(r) \propto e^{-r/T}`; the student fits the teacher's **soft labels** on them,
:math:`q_{u,i} = \sigma(t_{u,i} / \tau)` with :math:`t` the teacher's logit (read from the ranking artifact, which
stores the teacher's top-N scores, so no teacher call is needed):

.. math::

    \mathcal L_{CD} = \sum_{u \in \text{unique batch users}} \sum_{i \in S_u}
        \mathrm{BCE}\big(\sigma(\hat y_{u,i}),\ q_{u,i}\big),
    \qquad \mathcal L = \mathcal L_{base} + \lambda_{CD}\,\mathcal L_{CD}

Defaults (ours, to be tuned): ``k = 10``, ``T = 10``, ``tau = 1``, :math:`\lambda_{CD} = 0.1`. For BPR the
teacher's inner products serve as logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, reduce_terms
from rayrec.distill.lists import rank_discounted
from rayrec.distill.losses import soft_bce
from rayrec.errors import ConfigError


@dataclass
class CDConfig:
    k: int = 10  # sampled unobserved items per user and epoch
    T: float = 10.0  # rank-discount temperature of the sampling
    tau: float = 1.0  # soft-label temperature
    lambda_cd: float = 0.1  # λ_CD

    def __post_init__(self) -> None:
        if self.k < 1 or self.T <= 0 or self.tau <= 0 or self.lambda_cd < 0:
            raise ConfigError("distill.cd needs k >= 1, T > 0, tau > 0, lambda_cd >= 0")


class CD(DistillMethod):
    name = "cd"
    needs_ranking = True

    def __init__(self, cfg: CDConfig, *, topn: np.ndarray, topn_scores: np.ndarray) -> None:
        super().__init__()
        self.cfg = cfg
        self.topn = torch.as_tensor(topn, dtype=torch.int64)  # [U, N]
        self.soft = torch.sigmoid(torch.as_tensor(topn_scores, dtype=torch.float32) / cfg.tau)  # [U, N]
        n_valid = int((self.topn >= 0).sum(1).min())
        if n_valid < cfg.k:
            raise ConfigError(f"distill.cd.k={cfg.k} but some users have only {n_valid} items in the teacher's lists")
        self.n_valid = n_valid
        self.ranks = torch.arange(cfg.k).expand(self.topn.shape[0], -1).clone()  # [U, k]

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.ranks = rank_discounted(self.topn.shape[0], self.n_valid, self.cfg.k, self.cfg.T, generator)

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, torch.Tensor]:
        users = batch.uniq_users
        u = users.cpu()
        r = self.ranks[u]  # [U_b, k]
        items = self.topn[u].gather(1, r).to(users.device)
        targets = self.soft[u].gather(1, r).to(users.device)
        loss = soft_bce(student.score(users, items), targets)  # [U_b]
        return {"kd/cd": self.cfg.lambda_cd * reduce_terms(loss, reduction)}
