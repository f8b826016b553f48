r"""DE-RRD (Kang et al., CIKM 2020, eq. for the final objective):
:math:`\mathcal L = \mathcal L_{base} + \lambda_{DE}\mathcal L_{DE} + \lambda_{RRD}\mathcal L_{RRD}`, one optimiser
over the student, the experts and the selection networks. Either part is switched off by its weight
(``distill.de.lambda_de: 0`` or ``distill.rrd.lambda_rrd: 0``), which also skips computing it. The parts are
:class:`rayrec.distill.de.DE` and :class:`rayrec.distill.rrd.RRD` (see their docstrings for each term).
"""

from __future__ import annotations

import torch
from torch import nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest
from rayrec.distill.de import DE
from rayrec.distill.rrd import RRD


class DERRD(DistillMethod):
    name = "de_rrd"

    def __init__(self, de: DE | None, rrd: RRD | None) -> None:
        super().__init__()
        self.de = de if de is not None and de.cfg.lambda_de > 0 else None
        self.rrd = rrd if rrd is not None and rrd.cfg.lambda_rrd > 0 else None
        self.needs_teacher = self.de is not None
        self.needs_ranking = self.rrd is not None

    def _parts(self) -> list[DistillMethod]:
        return [p for p in (self.de, self.rrd) if p is not None]

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        for p in self._parts():
            p.on_epoch_start(epoch, generator)

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest | None:
        return self.de.teacher_request(batch) if self.de is not None else None

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, torch.Tensor]:
        out = {}
        for p in self._parts():
            out.update(p.losses(batch=batch, student=student, teacher=teacher, reduction=reduction))
        return out

    def epoch_metrics(self) -> dict[str, float]:
        return self.de.epoch_metrics() if self.de is not None else {}
