"""Per-epoch item lists drawn from the teacher's ranking, vectorised over users (no dense users x items mask).

- :func:`rank_discounted` — DE-RRD's interesting items: ``K`` distinct ranks out of the teacher's top-``N`` with
  probability ``∝ exp(-r / T)`` (Gumbel-top-k, drawing full noise only where a late rank could enter), sorted so
  the items keep the teacher's order.
- :class:`Uninteresting` — ``L`` distinct items per user drawn uniformly from the items that are neither the
  user's training items nor in the teacher's top-``N`` (rejection against one sorted key array, see
  :class:`rayrec.train.sampling.NegativeSampler`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rayrec.keys import unique_keys
from rayrec.train.sampling import NegativeSampler


def _gumbel(u: Tensor) -> Tensor:
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)  # Gumbel(0, 1) from U(0, 1)


def rank_discounted(num_users: int, N: int, K: int, T: float, generator: torch.Generator,
                    chunk: int = 65_536, head: int | None = None) -> Tensor:
    """``[num_users, K]`` 0-based ranks in ``[0, N)``, distinct per row, ascending, ``P(r) ∝ exp(-r / T)``.

    Gumbel-top-k over the ``N`` ranks, computed where it can matter: the top ``K`` of the first ``R`` ranks
    (``R = max(2K, K + 8T)``, or ``head``) give each row a threshold (its ``K``-th best key), and a later rank, whose
    logit is at most ``-R / T``, can only pass it with noise above ``threshold + R / T``: with a uniform draw above
    a bound ``b``. The ``N - R`` later uniforms enter only through their maximum, so that maximum is drawn directly
    (the largest of ``m`` uniforms is ``V^(1/m)``), and only a row where it reaches ``b`` (a few percent; the bound is
    lowered a little for rounding) draws its other later uniforms, given the maximum: at a uniform position, the
    rest uniform below it. Then that row is ranked over all ``N`` keys. The same distribution as the top-``K`` of
    ``N`` Gumbel keys per row, from ``R + 1`` draws per row instead of ``N`` (5,220 x 500, top-40, 2 threads:
    20 -> 14.5 ms). With the native kernels the first ``R`` ranks' keys and their top ``K`` come from
    ``gumbel_topk_head`` (the same float arithmetic; a selection instead of ``topk`` and a sort).
    """
    from rayrec.kernels import native

    lib = native()
    logits = -torch.arange(N, dtype=torch.float32) / T  # [N]
    R = min(N, head if head is not None else max(2 * K, K + math.ceil(8 * T)))
    if R < K:
        raise ValueError(f"rank_discounted: head {R} < K = {K}")
    out = []
    for s in range(0, num_users, chunk):
        n = min(chunk, num_users - s)
        u = torch.rand(n, R, generator=generator)  # [n, R] the first R ranks' uniforms
        if lib is not None:  # the same keys and choice, natively (a selection, not a top-k and a sort)
            ranks, kth = lib.gumbel_topk_head(u, float(T), K)  # [n, K] ascending, [n] the K-th best key
        else:
            idx = torch.topk(logits[:R] + _gumbel(u), K, dim=1)  # [n, K] the best of the first R ranks
            ranks, kth = idx.indices.sort(dim=1).values, idx.values[:, -1]
        if R < N:
            m = N - R
            tail_max = torch.rand(n, generator=generator, dtype=torch.float64).pow_(1.0 / m)  # [n]
            # a rank r >= R beats the row's K-th best key only if Gumbel(u_r) > kth - logits[R]; Gumbel(u) is
            # increasing in u, so compare u with that bound's preimage, lowered by a margin for float rounding
            need = (kth.double() - float(logits[R])).neg().exp().neg().exp() - 1e-6  # [n]
            rows = torch.nonzero(tail_max >= need).flatten()
            if rows.numel():
                top = tail_max[rows].clamp(max=1 - 2**-24).float().unsqueeze(1)  # [k, 1] torch.rand's range
                tail = torch.rand(rows.numel(), m, generator=generator).mul_(top)  # [k, m] below the maximum
                at = torch.randint(0, m, (rows.numel(), 1), generator=generator)  # [k, 1] where the maximum is
                tail.scatter_(1, at, top)
                ranks = ranks.clone()
                full = torch.topk(logits + _gumbel(torch.cat([u[rows], tail], dim=1)), K, dim=1).indices
                ranks[rows] = full.sort(dim=1).values
        out.append(ranks)
    return torch.cat(out) if out else torch.zeros(0, K, dtype=torch.int64)


class Uninteresting:
    """Uniform items outside each user's train items and teacher top-``N``.

    Args:
        train_indptr, train_indices: CSR of the train items ``[U + 1]``, ``[nnz]``.
        topn: ``[U, N]`` the teacher's lists (``-1`` pads short lists).
        num_items: ``I``.
    """

    def __init__(self, train_indptr: np.ndarray, train_indices: np.ndarray, topn: np.ndarray, num_items: int) -> None:
        U = len(train_indptr) - 1
        t_users = np.repeat(np.arange(U), np.diff(train_indptr))
        n_users = np.repeat(np.arange(U), topn.shape[1]).reshape(U, -1)
        keep = topn >= 0
        users = np.concatenate([t_users, n_users[keep]])
        items = np.concatenate([np.asarray(train_indices), topn[keep]])
        keys = unique_keys(users.astype(np.int64) * num_items + items)  # dedupe (a top-N item is never a train item)
        u, i = keys // num_items, keys % num_items
        indptr = np.zeros(U + 1, dtype=np.int64)
        np.cumsum(np.bincount(u, minlength=U), out=indptr[1:])
        self.sampler = NegativeSampler(indptr, i, num_items)

    def sample(self, users: Tensor, L: int, generator: torch.Generator) -> Tensor:
        """``[B, L]`` distinct uninteresting items for ``users`` ``[B]``."""
        return self.sampler.sample_distinct(users, L, generator)
