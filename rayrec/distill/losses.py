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

    Computed stably: each row is shifted by its largest term :math:`m` (the max of ``a`` and of
    :math:`\log\sum_j e^{b_j}`), so the suffix sums :math:`\sum_{l \ge k} e^{a_l - m} + \sum_j e^{b_j - m}` lie in
    :math:`(0, K + 1]` and come from one reversed ``cumsum``; rows where a suffix sum underflows (scores about 70
    apart, e.g. ±1e4) take an exact reversed ``logcumsumexp`` instead, so they stay finite. The same values as the
    ``logcumsumexp`` form everywhere (to float rounding), ~7x faster forward + backward on CPU (``[900, 40 + 40]``,
    one thread: 5.0 -> 0.7 ms), whose ``logcumsumexp`` backward dominated an RRD step. Returns ``[B]``.
    """
    tail = torch.logsumexp(b, dim=1, keepdim=True) if b is not None and b.shape[1] > 0 else None  # [B, 1]
    m = a.max(dim=1, keepdim=True).values  # [B, 1]
    if tail is not None:
        m = torch.maximum(m, tail)
    m = m.detach()  # any shift gives the same value; no gradient through the choice of shift
    sums = torch.exp(a - m).flip(1).cumsum(1).flip(1)  # [B, K] sum_{l>=k} exp(a_l - m)
    if tail is not None:
        sums = sums + torch.exp(tail - m)
    tiny = 1e-30  # far above float32's smallest normal: the log of a sum this small is still accurate
    suffix = torch.log(sums.clamp_min(tiny)) + m  # [B, K] log(sum_{l>=k} exp(a_l) + sum_j exp(b_j))
    under = torch.nonzero((sums < tiny).any(dim=1)).flatten()
    if under.numel():  # exact for those rows (the clamp above keeps their discarded values' gradient at 0)
        exact = torch.logcumsumexp(a[under].flip(1), dim=1).flip(1)
        if tail is not None:
            exact = torch.logaddexp(exact, tail[under])
        suffix = suffix.index_put((under,), exact)
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
