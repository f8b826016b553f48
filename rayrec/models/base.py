"""The interface every base recommender implements, and the shape vocabulary used across rayrec.

Shape letters: ``B`` users (or interaction rows) in a batch, ``C`` candidate items per row, ``I`` all items,
``U`` all users, ``D`` embedding size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn


class Recommender(nn.Module, ABC):
    """A scoring model over ``num_users`` x ``num_items``.

    Subclasses expose their user/item representations (KD methods read them) and two scoring paths:
    :meth:`score` for given candidates (sampled protocol, training) and :meth:`score_all` for full ranking.
    """

    num_users: int
    num_items: int
    dim: int

    @abstractmethod
    def user_repr(self, users: Tensor) -> dict[str, Tensor]:
        """Named user representations, each ``[B, D]``."""

    @abstractmethod
    def item_repr(self, items: Tensor) -> dict[str, Tensor]:
        """Named item representations, each ``[..., D]`` (same leading shape as ``items``)."""

    @abstractmethod
    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores (logits) of ``items`` ``[B, C]`` for ``users`` ``[B]`` -> ``[B, C]``."""

    def score_all(self, users: Tensor, item_chunk: int = 65536) -> Tensor:
        """Scores of every item for ``users`` ``[B]`` -> ``[B, I]``. Default: :meth:`score` over item chunks."""
        out = []
        for start in range(0, self.num_items, item_chunk):
            items = torch.arange(start, min(start + item_chunk, self.num_items), device=users.device)
            out.append(self.score(users, items.unsqueeze(0).expand(users.shape[0], -1)))
        return torch.cat(out, dim=1)  # [B, I]

    def dot_tables(self) -> tuple[Tensor, Tensor] | None:
        """``(U [Nu, D], V [Ni, D])`` whose row dot products are exactly :meth:`score` (differentiable), for
        kernels that gather and score lists themselves (:func:`rayrec.kernels.rrd_nll`); ``None`` (the default)
        for models that do not score by a dot product."""
        return None

    @abstractmethod
    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        """The model's own training loss on ``users`` ``[B]``, positives ``[B]`` and negatives ``[B, N]``."""

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.score(users, items)

    @contextmanager
    def shared_forward(self) -> Iterator[None]:
        """A span in which the weights do not change (one training step's losses, one evaluation pass): a model
        whose representations cost a whole-table computation (LightGCN's propagation) may compute them once and
        serve every lookup inside from it. Nothing for models whose lookups are independent."""
        yield

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def shared_forward(model: nn.Module):
    """``model.shared_forward()`` where the model has one (every :class:`Recommender`), else a no-op context."""
    fn = getattr(model, "shared_forward", None)
    return fn() if fn is not None else nullcontext()


def reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean()
    raise ValueError(f"unknown reduction {reduction!r} (sum | mean)")


class _BatchedDot(torch.autograd.Function):
    """``s[b, c] = <u[b], v[b, c]>`` with a backward that avoids ``einsum``'s: its gradient for ``v`` is a batched
    outer product, which ``einsum`` runs as a ``bmm`` with an inner size of 1, slow on CPU. Here it is one broadcast
    multiply, and the gradients are bit-equal to ``einsum``'s (tested). RRD's lists, ``[830, 80]`` x D 20, one
    thread, CPU time of gather + score + loss, forward and backward: ~9.5 -> ~8 ms."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor) -> Tensor:  # u [B, D], v [B, C, D]
        ctx.save_for_backward(u, v)
        return torch.einsum("bd,bcd->bc", u, v)  # [B, C]: einsum's forward, so the values stay bit-equal to it

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:  # g [B, C]
        u, v = ctx.saved_tensors
        gu = torch.bmm(g.unsqueeze(1), v).squeeze(1) if ctx.needs_input_grad[0] else None  # [B, D]
        gv = g.unsqueeze(2) * u.unsqueeze(1) if ctx.needs_input_grad[1] else None  # [B, C, D]
        return gu, gv


def batched_dot(u: Tensor, v: Tensor) -> Tensor:
    """``u`` ``[B, D]``, ``v`` ``[B, C, D]`` -> ``[B, C]`` dot products (``einsum("bd,bcd->bc")``, faster backward;
    the plain ``einsum`` when the dtypes differ, e.g. under autocast)."""
    if u.dtype != v.dtype or torch.is_autocast_enabled(u.device.type):
        return torch.einsum("bd,bcd->bc", u, v)
    return _BatchedDot.apply(u, v)


class _Rows(torch.autograd.Function):
    """``weight.index_select(0, ids)`` whose backward accumulates with ``index_put_(accumulate=True)`` instead of
    ``index_add_``: on CPU ``index_add_`` of a ``[n, D]`` gradient runs as a ``scatter_add_`` over an expanded
    ``[n, D]`` int64 index. On one thread both add the rows in id order, so the gradients are bit-equal (tested).
    25,182 x 20 table: RRD's 66k list ids per step 4.8 -> 1.7 ms, 1k ids the same (~0.05 ms). With more threads
    ``index_put_`` accumulates in parallel, in an order that changes from run to run, so :class:`Table` takes this
    path on one thread only (``train.threads_per_worker=1``, the default wherever workers >= cores)."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:  # weight [N, D], ids [n] -> [n, D]
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # g [n, D]
        (ids,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, g.shape[1]).index_put_((ids,), g, accumulate=True), None


class Table(nn.Embedding):
    """``nn.Embedding`` looked up with ``index_select``: the same rows and the same gradient, but backward is one
    accumulation into the ``[rows, D]`` gradient instead of ``embedding_dense_backward`` (which sorts the ids):
    ~10x faster on CPU for a step's many repeated ids (72k item ids of RRD's lists: 40 -> 3.6 ms with ``index_add_``,
    1.7 ms with :class:`_Rows`' ``index_put_``, 1 thread; more threads and other devices keep ``index_add_``).
    Parameters and state-dict keys are ``nn.Embedding``'s."""

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if (self.weight.device.type == "cpu" and self.weight.requires_grad and torch.is_grad_enabled()
                and torch.get_num_threads() == 1):
            rows = _Rows.apply(self.weight, flat)
        else:
            rows = self.weight.index_select(0, flat)
        return rows.view(*ids.shape, self.embedding_dim)  # [..., D]
