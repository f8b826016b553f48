"""Per-epoch item lists drawn from the teacher's ranking, vectorised over users (no dense users x items mask).

- :func:`rank_discounted` — DE-RRD's interesting items: ``K`` distinct ranks out of the teacher's top-``N`` with
  probability ``∝ exp(-r / T)`` (Gumbel-top-k: one ``[U, N]`` block of noise, chunked over users), sorted so the
  items keep the teacher's order.
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
                    chunk: int = 65_536) -> Tensor:
    """``[num_users, K]`` 0-based ranks in ``[0, N)``, distinct per row, ascending, ``P(r) ∝ exp(-r / T)``.

    Gumbel-top-k over the ``N`` ranks, computed where it can matter: the top ``K`` of the first ``R`` ranks
    (``R = max(2K, K + 8T)``) give each row a threshold (its ``K``-th best key), and a later rank, whose logit is at
    most ``-R / T``, can only pass it with noise above ``threshold + R / T``. Only the rows where some later rank's
    uniform draw reaches that (a few percent; the test is conservative) are ranked over all ``N``. The same draws
    and the same result as the top-``K`` of all ``N`` keys of every row, ~3x faster (5,220 x 500, top-40).
    """
    logits = -torch.arange(N, dtype=torch.float32) / T  # [N]
    R = min(N, max(2 * K, K + math.ceil(8 * T)))
    out = []
    for s in range(0, num_users, chunk):
        n = min(chunk, num_users - s)
        u = torch.rand(n, N, generator=generator)  # [n, N]
        idx = torch.topk(logits[:R] + _gumbel(u[:, :R]), K, dim=1)  # [n, K] the best of the first R ranks
        if R < N:
            # a rank r >= R beats the row's K-th best key only if Gumbel(u_r) > kth - logits[R]; Gumbel(u) is
            # increasing in u, so compare u with that bound's preimage, lowered by a margin for float rounding
            need = (idx.values[:, -1].double() - float(logits[R])).neg().exp().neg().exp() - 1e-6  # [n]
            rows = torch.nonzero(u[:, R:].max(dim=1).values.double() >= need).flatten()
            ranks = idx.indices
            if rows.numel():
                ranks = ranks.clone()
                ranks[rows] = torch.topk(logits + _gumbel(u[rows]), K, dim=1).indices
        else:
            ranks = idx.indices
        out.append(ranks.sort(dim=1).values)
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
