r"""MKD — multi-layer knowledge distillation (Zhu & Zhang, "From Input to Output: A Multi-layer Knowledge
Distillation Framework for Compressing Recommendation Models", arXiv 2311.04549 v1, 2023): one objective over the
input, intermediate and output layers (``../shared/docs/methods/mkd.md`` §7; no source gives the combination, this
is its natural form):

.. math::

    \mathcal L = \mathcal L_{base} + \lambda_N \mathcal L_{NKD} + \lambda_C\big(\mathcal L_{FD} + \alpha\,\mathcal R_{pair}
        + \beta\,\mathcal R_{list}\big) + \lambda_S \mathcal L_{SLD}

with :class:`rayrec.distill.nkd.NKD` (input layer), :class:`rayrec.distill.cpd.CPD` (intermediate) and
:class:`rayrec.distill.sld.SLD` (output); see their docstrings for each term. Every component is switchable
(``distill.mkd.components``, or its λ set to 0), so the ablations — each alone, each left out — run from config.
NKD and CPD each keep their own user and item projectors (4 modules, as in the code); all projectors are
training-only and never exported. One teacher lookup per step serves all components (their requests are
concatenated and the answer split back); each component has its own random stream, so an ablation leaves the
others' draws unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest
from rayrec.errors import ConfigError

COMPONENTS = ("nkd", "cpd", "sld")


@dataclass
class MKDConfig:
    """Which of MKD's components run (their hyperparameters: ``distill.nkd``, ``distill.cpd``, ``distill.sld``)."""

    components: list[str] = field(default_factory=lambda: list(COMPONENTS))

    def __post_init__(self) -> None:
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or len(set(self.components)) != len(self.components):
            raise ConfigError(f"distill.mkd.components must be distinct names of {list(COMPONENTS)}, got "
                              f"{self.components}")


def _cat(parts: list[Tensor | None]) -> tuple[Tensor | None, list[int]]:
    """Concatenate the non-None tensors; offsets (length n+1) to split them back."""
    offsets, acc, keep = [0], 0, []
    for p in parts:
        acc += 0 if p is None else p.shape[0]
        offsets.append(acc)
        if p is not None:
            keep.append(p)
    return (torch.cat(keep) if keep else None), offsets


def _split(d: dict[str, Tensor], a: int, b: int) -> dict[str, Tensor]:
    return {k: v[a:b] for k, v in d.items()}


class MKD(DistillMethod):
    """The sum of the given components (any of NKD, CPD, SLD; the ones whose λ is 0 are left out)."""

    name = "mkd"
    needs_teacher = True

    def __init__(self, parts: dict[str, DistillMethod]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        if not self.parts:
            raise ConfigError("distill.method=mkd with no component left (distill.mkd.components empty or every "
                              "λ = 0)")
        self.needs_teacher = any(p.needs_teacher for p in self.parts.values())

    def student_topk_request(self) -> tuple[int, bool] | None:
        reqs = [r for r in (p.student_topk_request() for p in self.parts.values()) if r is not None]
        if not reqs:
            return None
        if len({ex for _, ex in reqs}) > 1:
            raise ConfigError("MKD components ask for the student's ranking with and without train items; set "
                              "distill.sld.exclude_train=true (CPD's student guide excludes them)")
        return max(k for k, _ in reqs), reqs[0][1]

    def set_student_topk(self, topk: Tensor) -> None:
        for p in self.parts.values():
            if p.student_topk_request() is not None:
                p.set_student_topk(topk)

    def epoch_teacher_lists(self) -> Tensor | None:
        """The components' epoch lists side by side ``[U, ΣC]`` (split back in :meth:`set_teacher_scores`)."""
        lists = {n: p.epoch_teacher_lists() for n, p in self.parts.items()}
        self._list_cols = {n: x.shape[1] for n, x in lists.items() if x is not None}
        return torch.cat([x for x in lists.values() if x is not None], dim=1) if self._list_cols else None

    def set_teacher_scores(self, scores: Tensor) -> None:
        start = 0
        for n, width in self._list_cols.items():
            self.parts[n].set_teacher_scores(scores[:, start : start + width])
            start += width

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Each component draws from its own generator, seeded from ``generator`` and its name, so leaving one
        component out (an ablation) does not change the random draws of the others."""
        base = int(torch.randint(0, 2**40, (1,), generator=generator))
        for name, p in self.parts.items():
            p.on_epoch_start(epoch, torch.Generator().manual_seed(base + 7919 * COMPONENTS.index(name)))

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest:
        reqs = [p.teacher_request(batch) if p.needs_teacher else None for p in self.parts.values()]
        users, uo = _cat([r.users if r else None for r in reqs])
        items, io = _cat([r.items if r else None for r in reqs])
        if any(r is not None and r.score_users is not None for r in reqs):
            raise NotImplementedError("MKD merges representation requests only")
        batch.extras["mkd"] = (uo, io)
        return TeacherRequest(users=users, items=items)

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        uo, io = batch.extras["mkd"]
        out = {}
        for n, p in enumerate(self.parts.values()):
            answer = None
            if teacher is not None and p.needs_teacher:
                answer = TeacherAnswer(user=_split(teacher.user, uo[n], uo[n + 1]),
                                       item=_split(teacher.item, io[n], io[n + 1]))
            out.update(p.losses(batch=batch, student=student, teacher=answer, reduction=reduction))
        return out

    def epoch_metrics(self) -> dict[str, float]:
        out = {}
        for p in self.parts.values():
            out.update(p.epoch_metrics())
        return out
