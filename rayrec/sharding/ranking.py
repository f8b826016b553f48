"""Top-k over an item table that is sharded by rows, without any worker holding the whole table.

Every rank holds a contiguous block of item rows ``[offset, offset + I_r)`` (TorchRec row-wise sharding) and a
chunk of queries (user or item representations). One collective step:

1. all-gather the queries (padded to the largest chunk): every rank sees all ``W·B`` queries ``[W·B, D]``;
2. each rank scores them against *its* rows only, ``[W·B, I_r]``, masks excluded pairs (a user's train items, or
   the query item itself for neighbours) to ``-inf`` and keeps a partial top-k ``[W·B, k]``;
3. all-gather the partial lists ``[W, W·B, k]`` and merge them with one more top-k; each rank keeps its own rows.

Communication per step is ``O(W·B·D + W²·B·k)``; memory per rank ``O(W·B·I_r)``, so the full ``[U, I]`` score
matrix and the full item table never exist anywhere. Every rank must make the same number of calls (the caller
pads its chunk loop to the longest rank).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

from rayrec import kernels
from rayrec.distributed import all_gather_stack as _all_gather
from rayrec.distributed import world as _world
from rayrec.topk import block_topk, dot_scores


@torch.no_grad()
def sharded_topk(
    queries: Tensor,
    query_ids: Tensor,
    local_keys: Tensor,
    key_offset: int,
    k: int,
    exclude_indptr: Tensor | None = None,
    exclude_indices: Tensor | None = None,
    exclude_self: bool = False,
    score_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dot-product top-``k`` of this rank's ``queries`` over the row-sharded keys of all ranks (collective).

    Args:
        queries: ``[B_r, D]`` this rank's query vectors (``B_r`` may differ across ranks, may be 0).
        query_ids: ``[B_r]`` their ids (user ids for ``exclude_*`` rows, item ids for ``exclude_self``).
        local_keys: ``[I_r, D]`` this rank's rows of the key table (global rows ``key_offset ..``).
        key_offset: global id of ``local_keys[0]``.
        k: list length (at most the number of keys overall).
        exclude_indptr, exclude_indices: CSR over query ids of key ids never returned (e.g. train items).
        exclude_self: never return a query's own id (item neighbours).
        score_fn: ``(queries [Q, D_q], local_keys [I_r, D_k]) -> scores [Q, I_r]``; default the dot product
            (NeuMF passes its GMF + MLP scorer; queries and keys then hold both parts side by side).

    Returns:
        ``(scores [B_r, k], ids [B_r, k])``, best first. Slots with no admissible key hold ``-inf`` / ``-1``.
    """
    rank, world = _world()
    D = queries.shape[1]
    dev = queries.device  # every buffer on the queries' device (nccl collectives need CUDA tensors)
    n = torch.tensor([queries.shape[0]], dtype=torch.int64, device=dev)
    sizes = _all_gather(n).flatten()  # [W]
    bmax = int(sizes.max())
    q = torch.zeros(bmax, D, dtype=queries.dtype, device=dev)
    q[: queries.shape[0]] = queries
    ids = torch.full((bmax,), -1, dtype=torch.int64, device=dev)
    ids[: queries.shape[0]] = query_ids
    all_q = _all_gather(q).reshape(world * bmax, D)  # [W·B, D]
    all_ids = _all_gather(ids).reshape(world * bmax)  # [W·B]

    I_r = local_keys.shape[0]
    kk = min(k, I_r)
    if score_fn is None and kk > 0 and kernels.uses_native(all_q, local_keys):
        # the fused kernel: no [W·B, I_r] scores; the exclusions go in as a CSR over the local rows
        v, i = kernels.dot_topk(all_q, _transposed(local_keys), kk,
                                *_local_exclusions(all_ids, key_offset, I_r, exclude_indptr, exclude_indices,
                                                   exclude_self), pad=True)  # [W·B, kk] best first
        part_s = torch.full((world * bmax, k), -torch.inf, dtype=v.dtype, device=dev)
        part_i = torch.full((world * bmax, k), -1, dtype=torch.int64, device=dev)
        part_s[:, :kk] = v
        part_i[:, :kk] = torch.where(i >= 0, i + key_offset, i)
        if world == 1:  # the kernel's lists are sorted already: nothing to merge
            return part_s[: queries.shape[0]], part_i[: queries.shape[0]]
        return _merge(part_s, part_i, queries.shape[0], rank, bmax, world, k)
    scores = score_fn(all_q, local_keys) if score_fn is not None else dot_scores(all_q, local_keys.T)  # [W·B, I_r]
    if exclude_indptr is not None and I_r > 0:
        from rayrec.eval.evaluate import CSR

        have = torch.nonzero(all_ids >= 0).flatten()
        row, items = CSR(exclude_indptr, exclude_indices).rows(all_ids[have].to(exclude_indptr.device))
        row, items = row.to(dev), items.to(dev)  # excluded (query, key) pairs (the CSR may stay on the host)
        local = (items >= key_offset) & (items < key_offset + I_r)
        scores[have[row[local]], items[local] - key_offset] = -torch.inf
    if exclude_self and I_r > 0:
        local = (all_ids >= key_offset) & (all_ids < key_offset + I_r)
        rows = torch.nonzero(local).flatten()
        scores[rows, all_ids[rows] - key_offset] = -torch.inf

    part_s = torch.full((world * bmax, k), -torch.inf, dtype=scores.dtype, device=dev)
    part_i = torch.full((world * bmax, k), -1, dtype=torch.int64, device=dev)
    if kk > 0:
        v, i = block_topk(scores, kk)  # unsorted: the merge below sorts (~20% cheaper at k=500)
        part_s[:, :kk] = v
        part_i[:, :kk] = torch.where(torch.isinf(v) & (v < 0), torch.full_like(i, -1), i + key_offset)
    return _merge(part_s, part_i, queries.shape[0], rank, bmax, world, k)


# [(weakref to the table, its in-place version, its transposed copy)]: the last table's (a ranking job calls once per
# user chunk); a new table, or the same one modified in place, replaces it
_KEYS_T: list = []


def _transposed(keys: Tensor) -> Tensor:
    """``keys.T`` contiguous ``[D, I_r]``, as the fused kernel reads it, copied once per table: kept while the same
    tensor object, unmodified, comes back. CiteULike's d=200 teacher: a 20 MB copy that 5,220 users in chunks of
    1,024 made six times."""
    if not _KEYS_T or _KEYS_T[0][0]() is not keys or _KEYS_T[0][1] != keys._version:
        _KEYS_T[:] = [(weakref.ref(keys), keys._version, keys.T.contiguous())]
    return _KEYS_T[0][2]


def _merge(part_s: Tensor, part_i: Tensor, b_r: int, rank: int, bmax: int, world: int, k: int
           ) -> tuple[Tensor, Tensor]:
    """Merge the ``W`` partial lists ``[W·B, k]`` of this rank's own ``b_r`` queries (collective)."""
    all_s = _all_gather(part_s)[:, rank * bmax : rank * bmax + b_r]  # [W, B_r, k]
    all_i = _all_gather(part_i)[:, rank * bmax : rank * bmax + b_r]
    cand_s = all_s.permute(1, 0, 2).reshape(b_r, world * k)  # [B_r, W·k]
    cand_i = all_i.permute(1, 0, 2).reshape(b_r, world * k)
    top_s, j = torch.topk(cand_s, min(k, world * k), dim=1)
    return top_s, cand_i.gather(1, j)


def _local_exclusions(all_ids: Tensor, key_offset: int, I_r: int, exclude_indptr: Tensor | None,
                      exclude_indices: Tensor | None, exclude_self: bool) -> tuple[Tensor | None, Tensor | None]:
    """The excluded keys of every gathered query row as a CSR over this rank's local key ids (``[W·B + 1]``,
    ids sorted within a row), for :func:`rayrec.kernels.dot_topk`; ``(None, None)`` when nothing is excluded."""
    n = all_ids.shape[0]
    rows, cols = [], []
    have = torch.nonzero(all_ids >= 0).flatten()
    if exclude_indptr is not None and len(have):
        from rayrec.eval.evaluate import CSR

        row, items = CSR(exclude_indptr, exclude_indices).rows(all_ids[have].to(exclude_indptr.device))
        row, items = row.to(all_ids.device), items.to(all_ids.device)
        local = (items >= key_offset) & (items < key_offset + I_r)
        rows.append(have[row[local]])
        cols.append(items[local] - key_offset)
    if exclude_self:
        mine = torch.nonzero((all_ids >= key_offset) & (all_ids < key_offset + I_r)).flatten()
        rows.append(mine)
        cols.append(all_ids[mine] - key_offset)
    if not rows:
        return None, None
    # duplicates (self among the train items) once
    return kernels.exclusion_csr(torch.cat(rows), torch.cat(cols), n, I_r)
