"""Row-wise top-k of large score blocks, faster than one ``torch.topk`` on CPU (same values), and the dot-product
score blocks they are taken from."""

from __future__ import annotations

import torch
from torch import Tensor


SCORE_BLOCK = 2048  # items per GEMM of dot_scores (see there)


def dot_scores(queries: Tensor, keys_t: Tensor, block: int = SCORE_BLOCK) -> Tensor:
    """``queries @ keys_t`` for ``queries`` ``[B, D]`` and ``keys_t`` ``[D, I]`` (e.g. ``keys.T``, a view) ->
    ``[B, I]``, on CPU one GEMM per ``block`` items written into the result when the product is compute-bound
    (``D >= 64``, ``B >= 16``). Same values. A teacher-sized GEMM over tens of thousands of items runs well below the
    machine's rate in one piece; with blocks of 2,048 items (I = 25,182, D = 200, quiet machine, 2 threads / 1
    thread): 64 users 12.2 -> 10.5 / 11.7 -> 10.7 ms and 166 users 24.8 -> 21.2 / 33.7 -> 24.3 ms, plus the top-20.
    Narrow products (a d=20 student) gain nothing at 2 threads (166 users 9.0 -> 10.4 ms) and single users lose to
    the per-block calls (0.10 -> 0.18 ms), so they keep one matmul, as do other devices and products that need
    gradients."""
    B, D = queries.shape
    I = keys_t.shape[1]
    # traced (torch.export with a dynamic batch): no branch on B, which would pin the exported batch size
    few = B < 16 if not torch.compiler.is_compiling() else False
    if (queries.device.type != "cpu" or I <= 2 * block or D < 64 or few
            or (torch.is_grad_enabled() and (queries.requires_grad or keys_t.requires_grad))):
        return queries @ keys_t
    out = queries.new_empty(B, I)
    for s in range(0, I, block):
        out[:, s : s + block] = queries @ keys_t[:, s : s + block]  # [B, block]
    return out


def groups_for(n: int, k: int, device_type: str = "cpu") -> int:
    """:func:`block_topk`'s group size ``g`` for a top ``k`` of ``n`` columns. CPU: about ``n / (8 k)``, between 2
    and 16 (quiet machine, 2 threads, 1,024 x 25,182, k = 500, ms: g 3 64.7, 4 60.8, 5 54.4, 6 51.5, 8 63.7; k = 100:
    g 6 30.1, 8 28.5, 12 25.1). CUDA: about ``sqrt(n / k) / 2``, between 2 and 128, from an H100 sweep (GEMM +
    top-k, ms): 1,024 x 25,182, k = 20: g 4 0.33, 8-32 0.29, 64 0.33, 128 0.38; 1,024 x 1M, k = 20: 16 4.9, 32 4.5,
    64 4.3, 128 4.3; 64 x 1M: 16 0.41, 128 0.36; 5,220 x 25,182, k = 500: 4 2.89, 8 2.98, 16 3.43 (one topk 3.18)."""
    if device_type == "cuda":
        return max(2, min(128, round((n / max(k, 1)) ** 0.5 / 2)))
    return max(2, min(16, n // max(8 * k, 1)))


def block_topk(scores: Tensor, k: int, g: int = 0) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, dim=1, sorted=False)`` of ``scores`` ``[B, n]`` in two levels, same values (ties
    aside): the columns form ``G = n // g`` groups ``{j, j + G, ..., j + (g-1)G}``, whose maxima are one
    element-wise max over ``g`` contiguous ``[B, G]`` blocks; the ``k`` best groups hold a top ``k`` (an item
    outside them has ``k`` group maxima, distinct items, at least as large), so the last ``topk`` runs over their
    ``k·g`` items plus the ``n mod g`` leftover columns. ``g = 0``: :func:`groups_for`. One CPU thread, 1,024 x
    25,182 scores: k = 500 0.18 -> 0.11 s, k = 100 0.081 -> 0.054 s, k = 20 0.050 -> 0.024 s. On an H100 (GEMM
    included): 1,024 x 25,182, k = 20 0.56 -> 0.29 ms; 1,024 x 1M 14.1 -> 4.3 ms; 5,220 x 25,182, k = 500 3.18 ->
    2.89 ms. Falls back to one ``topk`` when the groups would not shrink the problem (``k·g > n / 2``) or on devices
    other than CPU and CUDA. Unsorted, like ``sorted=False``: sort the ``k`` values where the order matters."""
    B, n = scores.shape
    g = g or groups_for(n, k, scores.device.type)
    G = n // g
    if scores.device.type not in ("cpu", "cuda") or k * g * 2 > n or G == 0:
        return torch.topk(scores, k, dim=1, sorted=False)
    m = G * g
    blocks = scores[:, :m].unflatten(1, (g, G))  # [B, g, G] (a view when scores is contiguous)
    _, best = torch.topk(blocks.amax(dim=1), k, dim=1, sorted=False)  # [B, k] groups
    cols = (best.unsqueeze(2) + torch.arange(g, device=scores.device) * G).reshape(B, k * g)  # [B, k·g]
    if m < n:
        cols = torch.cat([cols, torch.arange(m, n, device=scores.device).expand(B, -1)], dim=1)
    v, j = torch.topk(scores.gather(1, cols), k, dim=1, sorted=False)
    return v, cols.gather(1, j)


def sorted_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`block_topk`, best first (``torch.topk(scores, k, dim=1)``; ties in any order)."""
    v, i = block_topk(scores, k)
    v, order = v.sort(dim=1, descending=True)
    return v, i.gather(1, order)
