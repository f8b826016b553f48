r"""SLD — Distillation with Soft Labels, MKD's output-layer part (Zhu & Zhang, arXiv 2311.04549 v1, 2023).
No code that is certainly v1's SLD exists; this follows the primary reconstruction of
``../shared/docs/methods/mkd.md`` §6.1 (the authors' first class named ``MKD``, 2024-10-28) with the alternative
readings of §6.2 selectable.

Output-layer baselines (RD, CD, RRD) turn the teacher's ranking into hard labels; SLD fits the teacher's **soft**
scores, over item lists built from **both** models' predictions. With :math:`\mathrm{Top}_T(u)` the teacher's
top-``K`` (the ranking artifact) and :math:`\mathrm{Top}_S(u)` the current student's top-``K``, recomputed at the
start of every epoch (distributed over the workers), and for an item list :math:`C`:

.. math::

    \mathrm{CE}_C(u) &= -\sum_{c \in C} \mathrm{softmax}(z^T_{u,C} / \tau)_c\,\log \mathrm{softmax}(z^S_{u,C} / \tau)_c\\
    \mathcal L_{SLD} &= \sum_{u \in \text{batch rows}} \Big[(1 - w_T - w_a)\,\mathrm{CE}_{\mathrm{Top}_S(u)}
        + w_T\,\mathrm{CE}_{\mathrm{Top}_T(u)} + w_a\,\mathrm{CE}_{\mathrm{Top}_S(u) \oplus \mathrm{Top}_T(u)}\Big],
    \qquad \mathcal L = \mathcal L_{base} + \lambda_S \mathcal L_{SLD}

:math:`z` are the models' raw scores (the teacher's constant), :math:`\oplus` concatenation. The gradient is
:math:`\propto \mathrm{softmax}(z^S/\tau) - \mathrm{softmax}(z^T/\tau)`, zero when the student's scores equal the
teacher's plus a constant (tested). Defaults (CiteULike BPR config of 2024-10-28): :math:`\lambda_S = 5`,
``tau = 1``, ``K = 100``, :math:`w_T = 0`, :math:`w_a = 1` (only the joint 200-item list).

Choices (configurable): ``users: rows`` sums over batch rows, so a user appears once per interaction in the batch
as in the code (computed once per unique user, weighted by its count); ``unique`` counts each user once.
``dedup: false`` keeps an item that is in both lists twice (the code); ``true`` drops the second copy.
``exclude_train: true`` (ours; the code excludes nothing) ranks the student over non-train items, like the
teacher's artifact (``rank.exclude: train``), so neither list spends its ``K`` slots on items the BPR loss already
fits. Alternative readings (§6.2): ``label: mixture`` — the label is
:math:`\beta\,\mathrm{softmax}(z^T/\tau) + (1-\beta)\,\mathrm{sg}(\mathrm{softmax}(z^S/\tau))`; ``lists: sampled``
— the list is ``K`` items rank-sampled (:math:`P(r) \propto e^{-r/T}`) from the teacher's top-``mxK`` plus ``L``
uniform items outside it and outside the train items, redrawn every epoch (the code's commented-out variant:
τ = 0.1, K = 100, mxK = 500, T = 10, L = 200).

The lists are fixed for an epoch, so the teacher scores them once at its start (``epoch_teacher_lists``: every user's
lists side by side, scored by the sharded teacher distributed over the workers) instead of in every batch that
holds the user; any teacher model (BPR-MF, NeuMF, LightGCN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer
from rayrec.distill.lists import Uninteresting, rank_discounted
from rayrec.errors import ConfigError


@dataclass
class SLDConfig:
    """SLD hyperparameters (``../shared/docs/methods/mkd.md`` §6)."""

    lambda_s: float = 5.0  # λ_S
    tau: float = 1.0  # softmax temperature (both sides)
    K: int = 100  # list length (both: each model's top-K; sampled: items drawn from the teacher's top-mxK)
    w_t: float = 0.0  # weight of the teacher-top-K list
    w_a: float = 1.0  # weight of the concatenated list (1 - w_t - w_a: the student-top-K list)
    lists: Literal["both", "sampled"] = "both"
    label: Literal["teacher", "mixture"] = "teacher"
    beta: float = 1.0  # mixture: weight of the teacher's distribution
    users: Literal["rows", "unique"] = "rows"
    dedup: bool = False
    exclude_train: bool = True
    T: float = 10.0  # sampled: rank-discount temperature
    mxK: int = 500  # sampled: the teacher's list the K items come from
    L: int = 200  # sampled: uniform items outside the teacher's list and the train items

    def __post_init__(self) -> None:
        if self.lambda_s < 0 or self.tau <= 0 or self.K < 1 or self.T <= 0 or self.L < 0:
            raise ConfigError("distill.sld needs lambda_s >= 0, tau > 0, K >= 1, T > 0, L >= 0")
        if min(self.w_t, self.w_a) < 0 or self.w_t + self.w_a > 1 + 1e-9:
            raise ConfigError(f"distill.sld needs w_t, w_a >= 0 and w_t + w_a <= 1 (got {self.w_t}, {self.w_a})")
        if not 0 <= self.beta <= 1:
            raise ConfigError("distill.sld.beta must be in [0, 1]")
        if self.lists == "sampled" and self.mxK < self.K:
            raise ConfigError("distill.sld with lists=sampled needs mxK >= K")


def soft_label_ce(z_s: Tensor, z_t: Tensor, tau: float, beta: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Per-row CE of the student's softmax against the soft label over a list: ``[B, C]`` -> ``[B]``.

    The label is ``beta · softmax(z_t/τ) + (1 - beta) · sg(softmax(z_s/τ))``; ``mask`` ``[B, C]`` (True = keep)
    drops list positions from both distributions."""
    if mask is not None:
        z_s = z_s.masked_fill(~mask, float("-inf"))
        z_t = z_t.masked_fill(~mask, float("-inf"))
    label = torch.softmax(z_t.detach() / tau, dim=-1)
    if beta < 1:
        label = beta * label + (1 - beta) * torch.softmax(z_s.detach() / tau, dim=-1)
    logp = F.log_softmax(z_s / tau, dim=-1)
    if mask is not None:
        logp = logp.masked_fill(~mask, 0.0)
    return -(label * logp).sum(dim=-1)


class SLD(DistillMethod):
    """Soft-label distillation (see the module docstring). ``topn`` ``[U, N]``: the teacher's lists
    (``N >= K``; ``N >= mxK`` for ``lists: sampled``)."""

    name = "sld"
    needs_teacher = True

    def __init__(self, cfg: SLDConfig, *, topn: np.ndarray, num_items: int,
                 train_csr: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.topn = torch.as_tensor(topn, dtype=torch.int64)  # [U, N]
        U, N = self.topn.shape
        need = cfg.mxK if cfg.lists == "sampled" else cfg.K
        n_valid = int((self.topn >= 0).sum(1).min()) if U else need
        if n_valid < (cfg.K if cfg.lists == "sampled" else need):
            raise ConfigError(f"distill.sld needs {need} items per user in the teacher's lists, some have {n_valid}; "
                              "lower distill.sld.K or rank more items (rank.top_n)")
        self.n_valid = min(n_valid, need)
        self.uninteresting = None
        if cfg.lists == "sampled" and cfg.L:
            if train_csr is None:
                raise ConfigError("distill.sld with lists=sampled needs the train interactions")
            self.uninteresting = Uninteresting(train_csr[0], train_csr[1], topn, num_items)
        self.teacher_top = self.topn[:, : cfg.K]  # [U, K]
        self.student_top: Tensor | None = None  # [U, K], set every epoch
        self.sampled: Tensor | None = None  # [U, K + L]
        self.t_scores: Tensor | None = None  # [U, C] the teacher's scores of epoch_teacher_lists, set every epoch

    def student_topk_request(self) -> tuple[int, bool] | None:
        return (self.cfg.K, self.cfg.exclude_train) if self.cfg.lists == "both" else None

    def set_student_topk(self, topk: Tensor) -> None:
        self.student_top = topk[:, : self.cfg.K].to(torch.int64)

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        c = self.cfg
        if c.lists == "sampled":
            U = self.topn.shape[0]
            ranks = rank_discounted(U, self.n_valid, c.K, c.T, generator)  # [U, K]
            parts = [self.topn.gather(1, ranks)]
            if self.uninteresting is not None:
                parts.append(self.uninteresting.sample(torch.arange(U), c.L, generator))
            self.sampled = torch.cat(parts, dim=1)

    def epoch_teacher_lists(self) -> Tensor:
        """This epoch's lists side by side, ``[U, C]``: ``[student top-K | teacher top-K]`` (``both``) or the
        sampled list; every list of :meth:`_lists` is a column range of it."""
        if self.cfg.lists == "sampled":
            return self.sampled
        if self.student_top is None:
            raise RuntimeError("SLD needs the student's top-K: the loop calls set_student_topk every epoch")
        return torch.cat([self.student_top, self.teacher_top], dim=1)  # [U, 2K]

    def set_teacher_scores(self, scores: Tensor) -> None:
        self.t_scores = scores.float()  # [U, C]

    def _lists(self, u_cpu: Tensor) -> list[tuple[float, Tensor, Tensor | None, slice]]:
        """``(weight, items [U_b, C], keep mask or None, columns of epoch_teacher_lists)`` per list with a non-zero
        weight."""
        c = self.cfg
        if c.lists == "sampled":
            return [(1.0, self.sampled[u_cpu], None, slice(None))]
        if self.student_top is None:
            raise RuntimeError("SLD needs the student's top-K: the loop calls set_student_topk every epoch")
        s, t = self.student_top[u_cpu], self.teacher_top[u_cpu]
        K = s.shape[1]
        out = []
        if 1 - c.w_t - c.w_a > 1e-12:
            out.append((1 - c.w_t - c.w_a, s, None, slice(0, K)))
        if c.w_t > 0:
            out.append((c.w_t, t, None, slice(K, 2 * K)))
        if c.w_a > 0:
            both = torch.cat([s, t], dim=1)  # [U_b, 2K] (an item in both lists appears twice)
            keep = None
            if c.dedup:
                dup = (t.unsqueeze(2) == s.unsqueeze(1)).any(dim=2)  # [U_b, K] teacher items already in s
                keep = torch.cat([torch.ones_like(s, dtype=torch.bool), ~dup], dim=1)
            out.append((c.w_a, both, keep, slice(None)))
        return out

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        c = self.cfg
        if c.lambda_s == 0:
            return {}
        if self.t_scores is None:
            raise RuntimeError("SLD needs the teacher's scores of its lists: the loop calls set_teacher_scores every "
                               "epoch")
        users = batch.uniq_users
        u_cpu = users.cpu()
        t_rows = self.t_scores[u_cpu]  # [U_b, C] this epoch's teacher scores of the batch users' lists
        if c.users == "rows":
            weight = torch.bincount(torch.searchsorted(users, batch.users), minlength=len(users)).float()  # [U_b]
        else:
            weight = torch.ones(len(users), device=users.device)
        total = 0.0
        for w, items, keep, cols in self._lists(u_cpu):
            items = items.to(users.device)
            z_t = t_rows[:, cols].to(users.device)  # [U_b, C]
            z_s = student.score(users, items)  # [U_b, C]
            ce = soft_label_ce(z_s, z_t, c.tau, c.beta if c.label == "mixture" else 1.0,
                               None if keep is None else keep.to(users.device))
            total = total + w * (ce * weight).sum() / (1.0 if reduction == "sum" else weight.sum())
        return {"kd/sld": c.lambda_s * total}
