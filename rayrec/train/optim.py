"""The dense optimizer shared by every loop (Ray Train and the plain single-process loop)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adam(params: Iterable[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with L2 ``weight_decay`` added to the gradient (``torch.optim.Adam``'s, the DE-RRD code's), as one fused
    kernel per parameter when every parameter is a floating-point tensor on CPU or CUDA: one pass over the
    parameter and its two moments instead of ~8. One CPU thread, a ``[67,200, 252]`` table (a d = 252 NeuMF's four
    tables): 0.15 s per step for the default implementation, 0.11 s with ``foreach``, 0.022 s fused. Same update
    rule; the last bits of the result differ from the unfused implementation."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
