"""Pure loss functions shared by the methods (hand-checkable; no models, no sampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relaxed_ranking_nll(a: Tensor, b: Tensor | None = None) -> Tensor:
    r"""Negative log of DE-RRD's relaxed Plackett-Luce likelihood, per row (DE-RRD eq. for :math:`p(\pi|s)`).

    ``a`` ``[B, K]`` student scores of the interesting items **in teacher order**; ``b`` ``[B, L]`` scores of the
    uninteresting items, which only appear in the denominators:

    .. math:: -\log p = -\sum_{k=1}^{K} \Big[a_k - \log\big(\sum_{l=k}^{K} e^{a_l} + \sum_{j=1}^{L} e^{b_j}\big)\Big]

    Computed with log-sum-exp (a reversed ``logcumsumexp`` for the suffix sums), so scores of ±1e4 stay finite.
    Returns ``[B]``.
    """
    suffix = torch.logcumsumexp(a.flip(1), dim=1).flip(1)  # [B, K] log sum_{l>=k} exp(a_l)
    if b is not None and b.shape[1] > 0:
        suffix = torch.logaddexp(suffix, torch.logsumexp(b, dim=1, keepdim=True))
    return -(a - suffix).sum(dim=1)


def gumbel_softmax(probs: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    r"""DE's soft expert selection: :math:`\mathrm{softmax}((\log(\alpha + 10^{-10}) + g) / \tau)`, ``g`` Gumbel(0, 1).

    ``probs`` ``[B, M]`` selection probabilities :math:`\alpha`; returns ``[B, M]`` (one-hot as :math:`\tau \to 0`).
    """
    u = torch.rand(probs.shape, generator=generator, device=probs.device if generator is None else "cpu")
    g = -torch.log(-torch.log(u.to(probs.device) + 1e-20) + 1e-20)
    return F.softmax((torch.log(probs + 1e-10) + g) / tau, dim=-1)


def weighted_log_sigmoid_nll(scores: Tensor, weights: Tensor) -> Tensor:
    r"""RD's loss on the teacher's top-K items: :math:`-\sum_r w_r \log\sigma(s_r)` per row. ``[B, K]`` -> ``[B]``."""
    return -(weights * F.logsigmoid(scores)).sum(dim=1)


def soft_bce(scores: Tensor, targets: Tensor) -> Tensor:
    """CD's loss: binary cross-entropy of student logits ``[B, C]`` against soft labels in [0, 1] -> ``[B]``."""
    return F.binary_cross_entropy_with_logits(scores, targets, reduction="none").sum(dim=1)
