"""The interface every distillation method implements, and what the loop hands it.

A method is an ``nn.Module`` (it may own trainable parameters, e.g. DE's experts: optimised with the student,
never exported) with three hooks, called by :mod:`rayrec.train.loop` for every method alike:

- :meth:`DistillMethod.on_epoch_start` — per-epoch state (DE's Gumbel temperature, RRD's sampled lists), then
  :meth:`DistillMethod.set_student_topk` for methods that ask for the current student's ranking (SLD), then
  :meth:`DistillMethod.set_teacher_scores` for methods whose item lists are fixed for the epoch
  (:meth:`DistillMethod.epoch_teacher_lists`: the teacher scores them once per epoch instead of once per batch);
- :meth:`DistillMethod.teacher_request` — which users/items the frozen (sharded) teacher must look up for this
  batch; the loop makes the lookup (a collective: every rank, every step) under ``no_grad``;
- :meth:`DistillMethod.losses` — the method's **weighted** loss terms for the batch, by name (``kd/de`` ...),
  computed inside the DDP forward so gradients reach the student and the method's own parameters.

Loss scale: like DE-RRD's code every term is a *sum* (over batch rows, unique entities or unique users), so the
paper's λ values apply unchanged with ``train.loss_reduction=sum``; with ``mean`` each term is divided by the
number of rows it sums (the base loss too) and the λ values must be re-tuned (see each method's docstring).

Shapes: ``B`` batch rows, ``N`` negatives per row, ``U_b``/``I_b`` unique users/items of a batch, ``D_s``/``D_t``
student/teacher dims, ``K``/``L`` list lengths, ``M`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass
class DistillBatch:
    """One training batch: ``users`` ``[B]``, ``pos`` ``[B]``, ``neg`` ``[B, N]`` and their unique ids."""

    users: Tensor
    pos: Tensor
    neg: Tensor
    extras: dict = field(init=False, default_factory=dict)  # per-step state a method keeps between its hooks

    # the unique ids, sorted, computed on first use (a method reads one or two of them)
    @cached_property
    def uniq_users(self) -> Tensor:  # [U_b]
        return torch.unique(self.users)

    @cached_property
    def uniq_pos(self) -> Tensor:  # [I_p]
        return torch.unique(self.pos)

    @cached_property
    def uniq_neg(self) -> Tensor:  # [I_n]
        return torch.unique(self.neg)


@dataclass
class TeacherRequest:
    """What the loop asks the teacher for: representations of ``users``/``items`` and scores of ``score_items``
    ``[B_s, C]`` for ``score_users`` ``[B_s]`` (any field may be None)."""

    users: Tensor | None = None
    items: Tensor | None = None
    score_users: Tensor | None = None
    score_items: Tensor | None = None


@dataclass
class TeacherAnswer:
    """The teacher's answer: ``user[name]`` ``[B_u, D_t]``, ``item[name]`` ``[B_i, D_t]``, ``scores`` ``[B_s, C]``."""

    user: dict[str, Tensor] = field(default_factory=dict)
    item: dict[str, Tensor] = field(default_factory=dict)
    scores: Tensor | None = None


class DistillMethod(nn.Module):
    """Base class: ``losses`` returns weighted terms keyed ``kd/<term>``; the loop adds them to the base loss."""

    name: ClassVar[str] = "none"
    needs_teacher: ClassVar[bool] = False  # look the teacher up every step (DE, CD)
    needs_ranking: ClassVar[bool] = False  # read the teacher's top-N artifact (RD, CD, RRD)

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Per-epoch state; ``generator`` is seeded from (seed, epoch) and identical on every rank."""

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest | None:
        return None

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Extra per-epoch values to report (e.g. ``kd/tau``)."""
        return {}

    def student_topk_request(self) -> tuple[int, bool] | None:
        """``(K, exclude_train)`` when the method needs the current student's top-``K`` items of every user at each
        epoch start (SLD, CPD with a student guide); the loop computes it distributed over the workers and hands it
        to :meth:`set_student_topk` after :meth:`on_epoch_start`."""
        return None

    def set_student_topk(self, topk: Tensor) -> None:
        """The student's top-``K`` ``[U, K]`` (best first), identical on every rank."""

    def epoch_teacher_lists(self) -> Tensor | None:
        """Item lists ``[U, C]`` (row ``u``: user ``u``'s items) whose teacher scores the method needs this epoch,
        asked after :meth:`set_student_topk`; the loop has the frozen teacher score them once, distributed over the
        workers (:meth:`rayrec.teacher.frozen.FrozenTeacher.score_lists`), and hands the ``[U, C]`` scores to
        :meth:`set_teacher_scores`. A user appears in many batches of an epoch: scoring its list once instead of in
        every batch saves the teacher that many lookups."""
        return None

    def set_teacher_scores(self, scores: Tensor) -> None:
        """The teacher's scores ``[U, C]`` of :meth:`epoch_teacher_lists`, identical on every rank."""


def reduce_terms(x: Tensor, reduction: str) -> Tensor:
    """Sum (the papers' scale) or mean of per-row/per-entity losses ``x``."""
    return x.sum() if reduction == "sum" else x.mean()
