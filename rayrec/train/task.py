"""The module the workers differentiate: the base model loss plus the distillation method's weighted terms.

Wrapping the loss computation in ``forward`` lets DDP (and TorchRec's pipelines) see one forward per step.
"""

from __future__ import annotations

from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer
from rayrec.models.base import Recommender, shared_forward


class TrainTask(nn.Module):
    """``forward(users, pos, neg) -> (total_loss, {term: detached value})``.

    Loss scale: DE-RRD sums every loss over the batch; its λ weights and Adam's L2 term assume that. Under DDP the
    gradients are *averaged* over ``W`` ranks, so with ``reduction="sum"`` each rank's loss is multiplied by ``W``:
    the applied gradient is then the gradient of the global batch sum, as in the single-process reference code.
    """

    def __init__(self, model: Recommender, reduction: str = "sum", world_size: int = 1,
                 method: DistillMethod | None = None) -> None:
        super().__init__()
        self.model = model
        self.method = method  # a distillation method's own parameters (DE experts) train with the student
        self.reduction = reduction
        self.scale = float(world_size) if reduction == "sum" else 1.0

    def forward(self, users: Tensor, pos: Tensor, neg: Tensor, batch: DistillBatch | None = None,
                teacher: TeacherAnswer | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        with shared_forward(self.model):  # the weights are fixed for the step: LightGCN propagates once
            base = self.model.base_loss(users, pos, neg, reduction=self.reduction)  # scalar, summed over [B]
            total, terms = base, {"base": base.detach()}
            if self.method is not None:
                kd = self.method.losses(batch=batch, student=self.model, teacher=teacher, reduction=self.reduction)
                for k, v in kd.items():  # weighted terms, e.g. kd/de = λ_DE · L_DE
                    total = total + v
                    terms[k] = v.detach()
        return total * self.scale, terms
