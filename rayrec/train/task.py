"""The module the workers differentiate: base model loss (+ distillation terms in later methods).

Wrapping the loss computation in ``forward`` lets DDP (and TorchRec's pipelines) see one forward per step.
"""

from __future__ import annotations

from torch import Tensor, nn

from rayrec.models.base import Recommender


class TrainTask(nn.Module):
    """``forward(users, pos, neg) -> (total_loss, {term: detached value})``.

    Loss scale: DE-RRD sums every loss over the batch; its λ weights and Adam's L2 term assume that. Under DDP the
    gradients are *averaged* over ``W`` ranks, so with ``reduction="sum"`` each rank's loss is multiplied by ``W``:
    the applied gradient is then the gradient of the global batch sum, as in the single-process reference code.
    """

    def __init__(self, model: Recommender, reduction: str = "sum", world_size: int = 1) -> None:
        super().__init__()
        self.model = model
        self.reduction = reduction
        self.scale = float(world_size) if reduction == "sum" else 1.0

    def forward(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        base = self.model.base_loss(users, pos, neg, reduction=self.reduction)  # scalar, summed over [B]
        return base * self.scale, {"base": base.detach()}
