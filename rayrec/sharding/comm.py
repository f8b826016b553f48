r"""Differentiable row exchanges between ranks (gloo or nccl), for models whose rows live on their owner rank.

Two primitives over ``all_to_all_single`` (uneven splits; gloo has had it since torch 1.7):

- :func:`all_to_all_rows`: rank ``r`` sends ``x[rows for s]`` to every rank ``s``; the backward pass sends the
  gradients back the same way reversed (the adjoint of a permutation of rows between ranks is its inverse).
- :func:`fetch_rows`: rows of a row-sharded tensor by ``(owner rank, index on the owner)`` for arbitrary requests:
  the requests are routed to their owners, which answer with only the requested rows, ``O(M·D)`` traffic for
  ``M`` requests, never an all-gather of the table. Gradients of the answers flow back to the owners' rows.

A *reduce-scatter* of per-rank partial sums over uneven row blocks is :func:`all_to_all_rows` followed by a sum
over the ``W`` received pieces (:func:`reduce_scatter_rows`):

.. math::

    Y_s = \sum_{r} P^{(r)}_s \qquad (P^{(r)} \text{ rank } r\text{'s partial } [N, D], \text{ split in row blocks } s)

This is used instead of ``torch.distributed.nn.functional.reduce_scatter`` on purpose: that one needs equal-sized
blocks on older gloo (and list-form ``reduce_scatter`` only came to gloo in torch 2.7, PR #149869), while the row
blocks of TorchRec's row-wise sharding are uneven (the last rank holds fewer rows) and may be empty.

Everything here is a collective: every rank must call it, the same number of times, in the same order, also
when it has nothing to send (empty tensors are fine); their backward passes are collectives too, and run in the
same order on every rank because every rank builds the same autograd graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rayrec.distributed import world as _world


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits)
        return gx, None, None


def all_to_all_rows(x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
    """Send ``x`` ``[sum(in_splits), ...]`` (consecutive row blocks for ranks ``0..W-1``), receive
    ``[sum(out_splits), ...]`` (blocks from ranks ``0..W-1``). Differentiable; collective. Identity for ``W = 1``."""
    if _world()[1] == 1:
        return x
    return _AllToAll.apply(x, [int(s) for s in out_splits], [int(s) for s in in_splits])


def exchange_counts(send_counts: Tensor) -> Tensor:
    """``send_counts`` ``[W]`` (what I send to each rank) -> ``[W]`` what each rank sends me (collective)."""
    if _world()[1] == 1:
        return send_counts.clone()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous())
    return recv


def reduce_scatter_rows(partial: Tensor, block_sizes: list[int]) -> Tensor:
    """Reduce-scatter over uneven row blocks: ``partial`` ``[N, D]`` (this rank's partial sums of all ``N`` rows,
    rank ``s``'s rows being the ``s``-th block of ``block_sizes``) -> ``[n_r, D]``, the sum over ranks of this rank's
    block. Differentiable (the backward is an all-gather of the gradient blocks, done as the reverse exchange)."""
    rank, W = _world()
    if W == 1:
        return partial  # (a copy through view + sum would cost an [N, D] pass forward and backward)
    n_r = int(block_sizes[rank])
    got = all_to_all_rows(partial, [n_r] * W, block_sizes)  # [W·n_r, D]: the W partial sums of my rows
    return got.view(W, n_r, *partial.shape[1:]).sum(0)


def fetch_rows(local: Tensor, owner: Tensor, index: Tensor) -> Tensor:
    """Rows ``local_{owner[m]}[index[m]]`` for requests ``m < M`` -> ``[M, D]`` (collective, differentiable).

    ``local`` ``[n_r, D]``: this rank's rows; ``owner`` ``[M]``: the rank holding each requested row; ``index``
    ``[M]``: its row on that rank. Three exchanges: request counts, requested indices, answered rows.
    """
    rank, W = _world()
    if W == 1:
        return local.index_select(0, index)
    order = torch.argsort(owner, stable=True)  # requests grouped by owner rank
    send = torch.bincount(owner, minlength=W)  # [W] requests I send to each rank
    recv = exchange_counts(send)  # [W] requests each rank sends me
    send_l, recv_l = send.tolist(), recv.tolist()
    asked = torch.empty(sum(recv_l), dtype=index.dtype, device=index.device)
    dist.all_to_all_single(asked, index[order].contiguous(), recv_l, send_l)  # row indices into my block
    answered = all_to_all_rows(local.index_select(0, asked), send_l, recv_l)  # [M, D], grouped by owner
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return answered.index_select(0, inverse)  # [M, D] in request order
