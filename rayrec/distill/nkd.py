r"""NKD — Distillation with Neighbor-based Knowledge, MKD's input-layer part (Zhu & Zhang, "From Input to Output: A
Multi-layer Knowledge Distillation Framework for Compressing Recommendation Models", arXiv 2311.04549 v1, 2023).
The paper's body is not public: this follows ``../shared/docs/methods/mkd.md`` §4, reconstructed from the
authors' code (``woriazzc/KDs``); every marked choice is configurable and the defaults are the code's.

Precomputed once by ``rank_teacher`` (``rank.user_neighbors`` / ``rank.item_neighbors``): each entity's ``K``
nearest neighbours by Euclidean distance after PCA to ≤ 150 dimensions of the teacher's table, itself excluded.
Every step, for every unique batch user, positive and negative item ``e``, one neighbour ``n`` is drawn uniformly
from :math:`N_K(e)` (the same for student and teacher) and the two are mixed in both spaces:

.. math::

    x_S = \lambda_S \odot e^S_e + (1 - \lambda_S) \odot e^S_n,\qquad
    x_T = \lambda_T \odot e^T_e + (1 - \lambda_T) \odot e^T_n,\qquad
    \lambda_S \sim U(0, 2\alpha)^{D_s},\ \lambda_T \sim U(0, 2\alpha)^{D_t}\ \text{independent}

(strategy ``soft``). A projector :math:`P` per side — ``M = 5`` MLPs ``D_s -> H -> D_t`` whose outputs are
averaged and L2-normalised — maps the student's mix, and the loss is a cosine distance:

.. math::

    \ell(e) = 1 - \Big\langle \frac{x_T}{\lVert x_T \rVert}, P(x_S) \Big\rangle,\qquad
    \mathcal L_{NKD} = \sum_{u} \ell(u) + \tfrac12\Big(\sum_{i \in pos} \ell(i) + \sum_{j \in neg} \ell(j)\Big),\qquad
    \mathcal L = \mathcal L_{base} + \lambda_N \mathcal L_{NKD}

Defaults (code, CiteULike BPR): :math:`\lambda_N = 0.5`, ``alpha = 0.5``, ``K = 5``, 5 experts, hidden
:math:`\lfloor (D_s + D_t)/2 \rfloor` without dropout (first commit; HEAD: ``D_t / 2`` with dropout 0.1).
Other mixing strategies of the code: ``hard`` (per dimension keep the own value with probability α), ``mix``
(λ = α), ``hardmix`` (the whole vector replaced by the neighbour's with probability 1 − α).
Which representation is mixed: ``representation: propagated`` (default; the code's ``get_user_embedding``, which for
LightGCN returns the propagated representations) or ``input`` (the ID embeddings, the paper's "input layer").
Projectors are training-only. ``precision: bf16`` runs their matmuls under bfloat16 autocast (as DE's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest, reduce_terms
from rayrec.distill.de import ExpertMLPs, check_precision
from rayrec.errors import ConfigError


@dataclass
class NKDConfig:
    """NKD hyperparameters (``../shared/docs/methods/mkd.md`` §4.3)."""

    lambda_n: float = 0.5  # λ_N
    K: int = 5  # neighbours per entity (the first K of the ranking artifact's lists)
    strategy: Literal["soft", "hard", "mix", "hardmix"] = "soft"
    alpha: float = 0.5  # α of the mixing strategy
    experts: int = 5  # MLPs averaged in each projector
    hidden: int = 0  # projector hidden width; 0 = (D_s + D_t) // 2
    dropout: float = 0.0  # projector dropout (HEAD code: 0.1)
    item_weight: float = 0.5  # weight of the item terms (code: 0.5 · (pos + neg))
    representation: Literal["propagated", "input"] = "propagated"
    precision: Literal["fp32", "bf16"] = "fp32"  # the projectors' matmuls (bf16: autocast, ~2.4x faster on AVX512-BF16)

    def __post_init__(self) -> None:
        if self.lambda_n < 0 or self.K < 1 or self.experts < 1 or self.hidden < 0:
            raise ConfigError("distill.nkd needs lambda_n >= 0, K >= 1, experts >= 1, hidden >= 0")
        if not 0 <= self.alpha <= 1 or not 0 <= self.dropout < 1:
            raise ConfigError("distill.nkd needs 0 <= alpha <= 1 and 0 <= dropout < 1")
        check_precision(self.precision, "distill.nkd.precision")


def mix_coefficients(shape: tuple[int, ...], strategy: str, alpha: float, generator: torch.Generator) -> Tensor:
    """λ of one side for ``shape`` ``[B, D]``: the weight of the entity itself (``1 - λ`` goes to the neighbour)."""
    if strategy == "soft":
        return torch.rand(shape, generator=generator) * (2 * alpha)
    if strategy == "hard":
        return (torch.rand(shape, generator=generator) < alpha).float()
    if strategy == "mix":
        return torch.full(shape, alpha)
    if strategy == "hardmix":
        return (torch.rand(shape[0], 1, generator=generator) < alpha).float().expand(shape).contiguous()
    raise ValueError(f"unknown NKD mixing strategy {strategy!r}")


class MeanProjector(ExpertMLPs):
    """``M`` MLPs ``D_s -> H -> D_t``, outputs averaged and L2-normalised -> ``[B, D_t]``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mean(x), dim=-1)  # plain mean of the M outputs


class NKD(DistillMethod):
    """Neighbour-mixing distillation (see the module docstring). ``user_nn`` ``[U, k]`` and ``item_nn`` ``[I, k]``
    are the teacher-space neighbour lists (``k >= K``)."""

    name = "nkd"
    needs_teacher = True

    def __init__(self, cfg: NKDConfig, *, student_dim: int, teacher_dim: int, user_nn: np.ndarray,
                 item_nn: np.ndarray) -> None:
        super().__init__()
        self.cfg = cfg
        for kind, nn_ in (("user", user_nn), ("item", item_nn)):
            if nn_ is None or nn_.shape[1] < cfg.K or (nn_[:, : cfg.K] < 0).any():
                raise ConfigError(f"distill.nkd.K={cfg.K} needs {cfg.K} {kind} neighbours per {kind} in the ranking "
                                  f"artifact (rank.{kind}_neighbors >= {cfg.K})")
        self.user_nn = torch.as_tensor(user_nn[:, : cfg.K], dtype=torch.int64)  # [U, K]
        self.item_nn = torch.as_tensor(item_nn[:, : cfg.K], dtype=torch.int64)  # [I, K]
        args = (cfg.experts, student_dim, teacher_dim, cfg.hidden, cfg.dropout, cfg.precision == "bf16")
        self.user_proj, self.item_proj = MeanProjector(*args), MeanProjector(*args)
        self.generator = torch.Generator().manual_seed(0)

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.generator = generator

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest:
        """Draw one neighbour per entity (kept on the batch for :meth:`losses`) and ask for both sides' vectors."""
        g = self.generator
        users = batch.uniq_users.cpu()
        items = torch.cat([batch.uniq_pos, batch.uniq_neg]).cpu()
        nu = self.user_nn[users, torch.randint(0, self.cfg.K, (len(users),), generator=g)]  # [U_b]
        ni = self.item_nn[items, torch.randint(0, self.cfg.K, (len(items),), generator=g)]  # [I_b]
        dev = batch.users.device
        batch.extras["nkd"] = (nu.to(dev), ni.to(dev))
        return TeacherRequest(users=torch.cat([users, nu]).to(dev), items=torch.cat([items, ni]).to(dev))

    def _student(self, student: nn.Module, kind: str, ids: Tensor) -> Tensor:
        fn = student.user_repr if kind == "user" else student.item_repr
        if self.cfg.representation == "input" and hasattr(student, "propagate"):
            return fn(ids, layer=0)["emb"]
        return fn(ids)["emb"]

    def _side(self, kind: str, s: Tensor, t: Tensor, proj: MeanProjector) -> Tensor:
        """Per-entity loss for ``s = [e; n]`` ``[2B, D_s]`` and ``t`` ``[2B, D_t]`` -> ``[B]``."""
        B = s.shape[0] // 2
        g = self.generator
        ls = mix_coefficients((B, s.shape[1]), self.cfg.strategy, self.cfg.alpha, g).to(s.device)
        lt = mix_coefficients((B, t.shape[1]), self.cfg.strategy, self.cfg.alpha, g).to(t.device)
        x_s = ls * s[:B] + (1 - ls) * s[B:]
        x_t = lt * t[:B] + (1 - lt) * t[B:]
        return 1 - (F.normalize(x_t, dim=-1) * proj(x_s)).sum(dim=-1)

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        if self.cfg.lambda_n == 0:
            return {}
        nu, ni = batch.extras["nkd"]
        users = batch.uniq_users
        items = torch.cat([batch.uniq_pos, batch.uniq_neg])
        key = "emb" if "emb" in teacher.user else next(iter(teacher.user))
        t_user, t_item = teacher.user[key].detach(), teacher.item[key].detach()
        lu = self._side("user", self._student(student, "user", torch.cat([users, nu])), t_user.float(), self.user_proj)
        li = self._side("item", self._student(student, "item", torch.cat([items, ni])), t_item.float(), self.item_proj)
        n_pos = batch.uniq_pos.shape[0]
        total = reduce_terms(lu, reduction) + self.cfg.item_weight * (
            reduce_terms(li[:n_pos], reduction) + reduce_terms(li[n_pos:], reduction))
        return {"kd/nkd": self.cfg.lambda_n * total}
