r"""Ranking metrics for the two evaluation protocols rayrec reports. Pure torch, no Ray.

Sampled protocol (DE-RRD leave-one-out)
    Each user's single held-out item is scored against :math:`N` fixed sampled negatives and its rank
    :math:`p_u \in \{1, \dots, N+1\}` among those :math:`N+1` candidates gives ``H@K``, ``N@K`` and ``M@K``.

Full-ranking protocol
    Each user's held-out items :math:`T_u` are ranked against *all* :math:`I` items, with the items the user
    must not be recommended (its training items, and its validation items when testing) removed from the candidate
    list. The per-item positions give ``Recall@K``, ``NDCG@K`` and ``HR@K``.

Ties are counted **pessimistically** in both protocols: an item tied with a held-out item is placed above it, so a
model that gives every item the same score gets the worst possible rank and scores 0 (instead of the optimistic or
order-dependent value an ordinary ``argsort``/``topk`` gives it). NaN scores never help a held-out item: a NaN
held-out score ranks below every candidate, a NaN candidate score ranks above every held-out item.

Every function returns **per-user** values (shape ``[B]``); the caller averages (and decides what to do with the
NaN the full protocol gives users without held-out items, e.g. ``torch.nanmean`` to skip them).

Shape letters used in the docstrings:

* ``B`` -- users in the chunk (rows),
* ``N`` -- sampled negatives per user (sampled protocol),
* ``I`` -- items in the catalogue (full protocol),
* ``H`` -- held-out items per user, padded with ``-1`` (full protocol),
* ``nnz`` -- stored entries of a CSR matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rayrec.topk import sorted_topk

__all__ = [
    "sampled_ranks",
    "sampled_metrics",
    "full_ranking_metrics",
    "HeldoutRanker",
    "masked_topk",
    "chunk_size_for",
    "select_csr_rows",
]

#: What the ``mask`` argument accepts: a bool ``[B, I]`` tensor (True = exclude), a CSR ``(indptr [B + 1],
#: indices [nnz])`` pair of the items to exclude, or ``None`` for no exclusion.
Mask = Tensor | tuple[Tensor, Tensor] | None

#: Dtype of the per-user metric values both protocols return (computed in float64, stored as float32).
METRIC_DTYPE = torch.float32


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------
def _check_ks(ks: Sequence[int]) -> list[int]:
    if isinstance(ks, int):
        ks = [ks]
    ks = list(ks)
    if not ks:
        raise ValueError("ks must name at least one cutoff K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every cutoff K must be a positive int, got {k!r} in ks={ks!r}")
    return ks


def _check_scores(scores: Tensor, name: str = "scores") -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape [B, I], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {scores.dtype}")


def _mask_pairs(
    num_rows: int,
    num_items: int,
    device: torch.device,
    mask: Mask,
    mask_indptr: Tensor | None,
    mask_indices: Tensor | None,
) -> Tensor | None:
    """The excluded ``(row, item)`` pairs ``[2, nnz]`` of a dense or CSR mask (checked), or a ``[B, I]`` bool tensor
    (a copy of a dense ``mask``), or ``None`` for none."""
    if mask is not None and (mask_indptr is not None or mask_indices is not None):
        raise ValueError("give the mask either positionally or as mask_indptr/mask_indices, not both")
    if isinstance(mask, (tuple, list)):
        if len(mask) != 2:
            raise ValueError("a CSR mask must be an (indptr, indices) pair")
        mask_indptr, mask_indices = mask
        mask = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a boolean tensor of shape [B, I]")
        if tuple(mask.shape) != (num_rows, num_items):
            raise ValueError(f"mask must have shape [B, I] = {(num_rows, num_items)}, got {tuple(mask.shape)}")
        return mask.to(device=device, copy=True)
    if mask_indptr is None and mask_indices is None:
        return None
    if mask_indptr is None or mask_indices is None:
        raise ValueError("mask_indptr and mask_indices must be given together")
    indptr = torch.as_tensor(mask_indptr).to(device=device, dtype=torch.int64)
    indices = torch.as_tensor(mask_indices).to(device=device, dtype=torch.int64)
    if indptr.dim() != 1 or indptr.numel() != num_rows + 1:
        raise ValueError(f"mask_indptr must have shape [B + 1] = [{num_rows + 1}], got {tuple(indptr.shape)}")
    if indices.dim() != 1:
        raise ValueError(f"mask_indices must be 1-D, got shape {tuple(indices.shape)}")
    counts = indptr[1:] - indptr[:-1]
    if num_rows and (bool((counts < 0).any()) or int(indptr[0]) < 0 or int(indptr[-1]) > indices.numel()):
        raise ValueError(
            "mask_indptr must be non-decreasing with 0 <= indptr[0] and indptr[-1] <= len(mask_indices) "
            f"= {indices.numel()}"
        )
    if num_rows == 0:
        return torch.zeros(2, 0, dtype=torch.int64, device=device)
    # A row range of a bigger CSR is accepted as is: row r owns indices[indptr[r]:indptr[r+1]].
    cols = indices[int(indptr[0]) : int(indptr[-1])]
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= num_items):
        raise ValueError(
            f"mask_indices must lie in [0, I) = [0, {num_items}), got [{int(cols.min())}, {int(cols.max())}]"
        )
    rows = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    return torch.stack([rows, cols])


def _build_mask(num_rows: int, num_items: int, device: torch.device, *mask_args) -> Tensor | None:
    """Returns the boolean ``[B, I]`` exclusion mask (a fresh tensor, never the caller's), or ``None`` for none;
    ``mask_args``: ``mask, mask_indptr, mask_indices`` as :func:`_mask_pairs` takes them."""
    m = _mask_pairs(num_rows, num_items, device, *mask_args)
    if m is None or m.dtype == torch.bool:
        return m
    out = torch.zeros(num_rows, num_items, dtype=torch.bool, device=device)
    out[m[0], m[1]] = True
    return out


def _check_truth(truth: Tensor, num_rows: int, num_items: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Returns ``(truth [B, H] int64 on device, valid [B, H] bool)``; raises on bad ids or duplicates."""
    truth = torch.as_tensor(truth)
    if truth.dim() != 2 or truth.shape[0] != num_rows:
        raise ValueError(f"truth must have shape [B, H] with B = {num_rows}, got {tuple(truth.shape)}")
    if truth.is_floating_point() or truth.dtype == torch.bool or truth.is_complex():
        raise ValueError(f"truth must hold integer item ids (-1 for padding), got dtype {truth.dtype}")
    truth = truth.to(device=device, dtype=torch.int64)
    valid = truth >= 0
    if truth.numel():
        bad = (truth < -1) | (truth >= num_items)
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"truth[{r}, {c}] = {int(truth[r, c])} is not an item id in [0, {num_items}) nor the padding -1"
            )
        if truth.shape[1] > 1:
            srt = truth.sort(dim=1).values
            dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
            if bool(dup.any()):
                r = int(dup.any(dim=1).nonzero()[0])
                raise ValueError(f"truth row {r} lists a held-out item twice: {truth[r].tolist()}")
    return truth, valid


# --------------------------------------------------------------------------------------------------------------
# sampled protocol
# --------------------------------------------------------------------------------------------------------------
def sampled_ranks(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Rank of each user's held-out item among itself and its :math:`N` sampled negatives (1 = best).

    .. math::
        p_u = 1 + \sum_{j=1}^{N} \mathbb{1}\left[ s_{u,j}^{-} \ge s_u^{+} \right]

    Ties count against the held-out item (pessimistic), so a constant-score model gets :math:`p_u = N + 1`.
    A NaN held-out score gives :math:`p_u = N + 1`; a NaN negative counts as scoring above the held-out item.

    Args:
        pos_scores: ``[B]`` score of each user's held-out item.
        neg_scores: ``[B, N]`` scores of each user's sampled negatives.

    Returns:
        ``[B]`` int64 ranks in :math:`\{1, \dots, N + 1\}`.
    """
    if not isinstance(pos_scores, Tensor) or not isinstance(neg_scores, Tensor):
        raise TypeError("pos_scores and neg_scores must be torch.Tensors")
    if pos_scores.dim() != 1:
        raise ValueError(f"pos_scores must have shape [B], got {tuple(pos_scores.shape)}")
    if neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(
            f"neg_scores must have shape [B, N] with B = {pos_scores.shape[0]}, got {tuple(neg_scores.shape)}"
        )
    pos = pos_scores.to(neg_scores.device).unsqueeze(1)
    above = (neg_scores >= pos) | torch.isnan(neg_scores) | torch.isnan(pos)
    return 1 + above.sum(dim=1, dtype=torch.int64)


def sampled_metrics(ranks: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    r"""Per-user hit ratio, NDCG and MRR at each cutoff from sampled-protocol ranks.

    With :math:`p_u` the rank from :func:`sampled_ranks` (one held-out item, binary gain, so IDCG = 1):

    .. math::
        \mathrm{H@K}_u = \mathbb{1}[p_u \le K], \qquad
        \mathrm{N@K}_u = \frac{\mathbb{1}[p_u \le K]}{\log_2(p_u + 1)}, \qquad
        \mathrm{M@K}_u = \frac{\mathbb{1}[p_u \le K]}{p_u}

    Args:
        ranks: ``[B]`` integer ranks, 1 = best.
        ks: cutoffs :math:`K` (positive ints).

    Returns:
        ``{"H@K": [B], "N@K": [B], "M@K": [B]}`` for every K in ``ks``, float32.
    """
    ks = _check_ks(ks)
    if not isinstance(ranks, Tensor) or ranks.dim() != 1:
        raise ValueError("ranks must be a 1-D tensor of shape [B]")
    if ranks.is_floating_point():
        if bool((ranks != ranks.round()).any()):
            raise ValueError("ranks must be integers")
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"ranks must be >= 1, got min {int(ranks.min())}")
    p = ranks.to(torch.float64)
    ndcg = 1.0 / torch.log2(p + 1.0)
    mrr = 1.0 / p
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = ranks <= k
        out[f"H@{k}"] = hit.to(METRIC_DTYPE)
        out[f"N@{k}"] = torch.where(hit, ndcg, 0.0).to(METRIC_DTYPE)
        out[f"M@{k}"] = torch.where(hit, mrr, 0.0).to(METRIC_DTYPE)
    return out


# --------------------------------------------------------------------------------------------------------------
# full-ranking protocol
# --------------------------------------------------------------------------------------------------------------
def _heldout_positions(scores: Tensor, exclude: Tensor | None, truth: Tensor, valid: Tensor, kmax: int) -> Tensor:
    """``[B, H]`` int64 pessimistic positions of the held-out items (garbage where ``valid`` is False).

    Positions above ``kmax`` are not resolved: any such item gets ``kmax + 1`` (no metric at a cut-off
    ``<= kmax`` can tell them apart). Only the ``kmax`` best candidates per row are needed: with ``v`` the top-``kmax``
    candidate scores (held-out and masked items are not candidates), a held-out score ``s_h <= v[kmax]`` has at
    least ``kmax`` candidates at or above it, and for ``s_h > v[kmax]`` every candidate at or above it is in ``v``.
    Cost: one ``topk`` over ``[B, I]`` plus ``[B, H, kmax]`` comparisons, instead of a pass over ``[B, I]`` per
    held-out column. Memory besides ``scores``: one ``[B, I]`` float copy and ``[B, I]`` bool masks.
    """
    num_rows, num_items = scores.shape
    device = scores.device
    heldout = torch.zeros(num_rows, num_items, dtype=torch.bool, device=device)
    rows = torch.arange(num_rows, device=device).unsqueeze(1).expand_as(truth)
    heldout[rows[valid], truth[valid]] = True

    # Candidate scores: NaN candidates rank above everything (+inf, which also ties with a +inf held-out item and
    # wins the tie); masked and held-out items are not candidates (-inf, and not counted: see n_cand).
    other = torch.nan_to_num(scores, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)  # one pass, a copy
    if exclude is not None:
        heldout |= exclude
    n_cand = num_items - _row_counts(heldout)  # [B] candidates per row
    other.masked_fill_(heldout, -torch.inf)
    del heldout

    # Held-out scores: a NaN held-out item ranks below every candidate (-inf, and loses -inf ties).
    th = scores.gather(1, truth.clamp(min=0))
    th = torch.where(torch.isnan(th), -torch.inf, th)
    th = th.masked_fill(~valid, torch.nan)  # padding never counts as a held-out item ranked above another

    top = sorted_topk(other, min(kmax, num_items))[0]  # [B, L] best candidates, descending
    del other
    return positions_from_top(top, n_cand, th, kmax)


def _row_counts(mask: Tensor) -> Tensor:
    """``[B]`` int64 number of True entries per row of a ``[B, I]`` bool mask: int16 sums over column blocks that
    cannot overflow (a bool ``sum`` accumulates in int64 and is several times slower on CPU)."""
    out = torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    for a in range(0, mask.shape[1], 32_767):
        out += mask[:, a : a + 32_767].sum(dim=1, dtype=torch.int16)
    return out


def positions_from_top(top: Tensor, n_cand: Tensor, th: Tensor, kmax: int) -> Tensor:
    """Pessimistic positions ``[B, H]`` of held-out scores ``th`` from the best candidate scores ``top`` ``[B, L]``.

    ``top`` holds each row's ``L = min(kmax, ·)`` best candidate scores (descending; held-out and masked items are
    not candidates; entries past ``n_cand`` are fillers), ``n_cand`` ``[B]`` the number of candidates, ``th`` the
    held-out scores (NaN on padding; a NaN held-out score must already be ``-inf``). Positions beyond ``kmax`` are
    reported as ``kmax + 1``. Shared by the single-process path and the row-sharded path (``rayrec.eval.evaluate``).
    """
    L = top.shape[1]
    device = top.device
    real = torch.arange(L, device=device).unsqueeze(0) < n_cand.unsqueeze(1)  # [B, L] entries that are candidates
    # unmasked non-held-out items with score >= s_h (ties pessimistic)
    at_or_above = ((top.unsqueeze(1) >= th.unsqueeze(2)) & real.unsqueeze(1)).sum(dim=2)  # [B, H]
    # other held-out items with a higher score, or an equal score and an earlier column
    col = torch.arange(th.shape[1], device=device)
    before = ((th.unsqueeze(1) > th.unsqueeze(2)) | ((th.unsqueeze(1) == th.unsqueeze(2)) & (col < col.unsqueeze(1)))).sum(dim=2)
    pos = 1 + at_or_above + before  # [B, H]
    if L > 0:
        beyond = (n_cand > L).unsqueeze(1) & (th <= top[:, L - 1 : L])  # at least L >= kmax candidates above
        pos = pos.masked_fill(beyond, kmax + 1)
    return pos


def full_metrics_from_positions(pos: Tensor, valid: Tensor, ks: list[int]) -> dict[str, Tensor]:
    """Per-user Recall/NDCG/HR@K from held-out positions ``[B, H]`` (``valid`` marks real held-out entries)."""
    device = pos.device
    n_gt = valid.sum(dim=1)
    no_gt = n_gt == 0
    disc = 1.0 / torch.log2(pos.to(torch.float64) + 1.0)  # [B, H]
    kmax = max(ks)
    # idcg_table[m] = sum_{i=1}^{m} 1 / log2(i + 1), m = 0..kmax
    idcg_table = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64, device=device),
            torch.cumsum(1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=device)), 0),
        ]
    )
    nan = torch.tensor(torch.nan, dtype=torch.float64, device=device)
    out: dict[str, Tensor] = {}
    for k in ks:
        in_k = valid & (pos <= k)
        hits = in_k.sum(dim=1)
        recall = hits.to(torch.float64) / n_gt.clamp(min=1)
        dcg = torch.where(in_k, disc, 0.0).sum(dim=1)
        idcg = idcg_table[n_gt.clamp(max=k)]
        ndcg = dcg / idcg.clamp(min=1e-300)
        hr = (hits > 0).to(torch.float64)
        out[f"Recall@{k}"] = torch.where(no_gt, nan, recall).to(METRIC_DTYPE)
        out[f"NDCG@{k}"] = torch.where(no_gt, nan, ndcg).to(METRIC_DTYPE)
        out[f"HR@{k}"] = torch.where(no_gt, nan, hr).to(METRIC_DTYPE)
    return out


# Up to this many held-out columns, the positions are counted with one pass over [B, I] per column
# (_heldout_positions_by_count); beyond, one top-k over [B, I] serves every column (_heldout_positions).
COUNT_MAX_HELDOUT = 2


def _full_ranking_block(
    scores: Tensor,
    mask: Mask,
    truth: Tensor,
    ks: list[int],
    mask_indptr: Tensor | None,
    mask_indices: Tensor | None,
) -> dict[str, Tensor]:
    ranker = HeldoutRanker(scores.shape[1], truth, mask, mask_indptr=mask_indptr, mask_indices=mask_indices,
                           device=scores.device, num_rows=scores.shape[0])
    return full_metrics_from_positions(*ranker.positions(scores, 0, max(ks)), ks)


class HeldoutRanker:
    """Pessimistic full-ranking positions of a fixed list of ``B`` users' held-out items, ranked block by block.

    Everything that does not depend on the scores is done once, here: the held-out ids are checked (in ``[0, I)``,
    none twice in a row), the exclusions become unique ``(row, item)`` pairs sorted by row, and no held-out item may
    be excluded. Ranking a block of rows (:meth:`positions`) then costs only its passes over the block's scores, so
    an evaluation that scores all users in cache-sized blocks pays these steps once instead of once per block
    (:func:`rayrec.eval.evaluate.evaluate`). :func:`full_ranking_metrics` is this class on a single block. The
    held-out items are kept as a CSR and padded per block, so one user with many held-out items widens only its
    block.

    Args:
        num_items: ``I``.
        truth: the held-out item ids, ``[B, H]`` padded with ``-1`` (anywhere in a row; tied held-out items are
            ordered by column), or a CSR pair ``(indptr [B + 1], indices [nnz])`` (ordered as listed).
        mask: the exclusions, as :func:`full_ranking_metrics` takes them (bool ``[B, I]``, CSR pair or ``None``;
            ``mask_indptr``/``mask_indices`` as keywords).
        device: where the blocks' scores will be (default: ``truth``'s device).
        num_rows: ``B`` (default: ``truth``'s rows).
    """

    def __init__(self, num_items: int, truth: Tensor | tuple[Tensor, Tensor], mask: Mask = None, *,
                 mask_indptr: Tensor | None = None, mask_indices: Tensor | None = None,
                 device: torch.device | str | None = None, num_rows: int | None = None) -> None:
        if isinstance(truth, (tuple, list)):
            if len(truth) != 2:
                raise ValueError("a CSR truth must be an (indptr, indices) pair")
            t_ptr, t_idx = (torch.as_tensor(x) for x in truth)
            device = torch.device(device) if device is not None else t_idx.device
            num_rows = t_ptr.numel() - 1 if num_rows is None else num_rows
            t_ptr, t_idx = t_ptr.to(device=device, dtype=torch.int64), t_idx.to(device=device, dtype=torch.int64)
            t_len = t_ptr[1:] - t_ptr[:-1]
            if t_ptr.dim() != 1 or t_ptr.numel() != num_rows + 1 or int(t_ptr[0]) != 0 or bool((t_len < 0).any()) \
                    or t_idx.dim() != 1 or int(t_ptr[-1]) != t_idx.numel():
                raise ValueError(f"a CSR truth needs indptr [B + 1] = [{num_rows + 1}] from 0, non-decreasing, "
                                 f"ending at len(indices); got {tuple(t_ptr.shape)} and {tuple(t_idx.shape)}")
            t_row = torch.repeat_interleave(torch.arange(num_rows, device=device), t_len)
            if t_idx.numel() and (int(t_idx.min()) < 0 or int(t_idx.max()) >= num_items):
                raise ValueError(f"truth ids must lie in [0, {num_items}), got [{int(t_idx.min())}, {int(t_idx.max())}]")
            key = t_row * num_items + t_idx
            if torch.unique(key).numel() != key.numel():
                srt = key.sort().values
                r = int(srt[1:][srt[1:] == srt[:-1]][0]) // num_items
                raise ValueError(f"truth row {r} lists a held-out item twice: {t_idx[t_ptr[r]:t_ptr[r + 1]].tolist()}")
        else:
            truth = torch.as_tensor(truth)
            device = torch.device(device) if device is not None else truth.device
            num_rows = truth.shape[0] if num_rows is None else num_rows
            truth, valid = _check_truth(truth, num_rows, num_items, device)  # [B, H]
            t_row, t_col = valid.nonzero().T  # row-major: each row's held-out items in column order
            t_idx, t_len = truth[t_row, t_col], valid.sum(dim=1)
        self.num_rows, self.num_items = num_rows, num_items
        self.t_len = t_len  # [B] held-out items per row
        self.t_ptr = [0] + torch.cumsum(t_len, 0).tolist()  # [B + 1]
        self.t_row, self.t_idx = t_row, t_idx  # [nnz_t]
        self.t_col = torch.arange(t_idx.numel(), device=device) - torch.repeat_interleave(  # column in the row
            torch.tensor(self.t_ptr[:-1], dtype=torch.int64, device=device), t_len)
        pairs = _mask_pairs(num_rows, num_items, device, mask, mask_indptr, mask_indices)
        if pairs is not None and pairs.dtype == torch.bool:
            pairs = pairs.nonzero().T  # [2, nnz]
        # unique, sorted by row then item; raises if a held-out item is excluded
        pairs = _unique_pairs(pairs, num_items, t_row * num_items + t_idx)
        self.indptr = ([0] * (num_rows + 1) if pairs is None else  # [B + 1] row r's pairs: indptr[r]:indptr[r+1]
                       torch.searchsorted(pairs[0], torch.arange(num_rows + 1, device=device)).tolist())
        # kept for every evaluation: int32 where ids fit (half the memory of the train CSR's int64 pairs)
        small = max(num_rows, num_items) < 2**31
        self.pairs = pairs if pairs is None or not small else pairs.to(torch.int32)  # [2, nnz]

    def truth(self, start: int, b: int) -> Tensor:
        """``[b, H_b]`` held-out ids of rows ``start .. start + b`` padded with ``-1`` (``H_b`` >= 1: the block's
        largest count)."""
        lo, hi = self.t_ptr[start], self.t_ptr[start + b]
        width = max(1, int(self.t_len[start : start + b].max())) if b and hi > lo else 1
        out = torch.full((b, width), -1, dtype=torch.int64, device=self.t_idx.device)
        out[self.t_row[lo:hi] - start, self.t_col[lo:hi]] = self.t_idx[lo:hi]
        return out

    def positions(self, scores: Tensor, start: int, kmax: int) -> tuple[Tensor, Tensor]:
        """``(positions [b, H_b] int64, valid [b, H_b] bool)`` of rows ``start .. start + b`` from their scores
        ``[b, I]``: positions beyond ``kmax`` reported as ``kmax + 1``, garbage where ``valid`` is False (padding).
        For :func:`full_metrics_from_positions`."""
        truth, valid, pairs = self._block(start, scores.shape[0], scores.shape[1], scores.device)
        if truth.shape[1] <= COUNT_MAX_HELDOUT:
            return _heldout_positions_by_count(scores, pairs, truth, valid, kmax), valid
        exclude = None
        if pairs is not None:
            exclude = torch.zeros(scores.shape[0], self.num_items, dtype=torch.bool, device=scores.device)
            exclude[pairs[0], pairs[1]] = True
        return _heldout_positions(scores, exclude, truth, valid, kmax), valid

    def _block(self, start: int, b: int, num_cols: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows ``start .. start + b`` (checked against ``num_cols`` scored items): their held-out ids ``[b, H_b]``,
        which of them are real, and their excluded pairs ``[2, nnz]`` with block-local rows (``None``: none)."""
        if num_cols != self.num_items or not 0 <= start <= start + b <= self.num_rows:
            raise ValueError(f"a block of rows [{start}, {start + b}) x {num_cols} items does not fit "
                             f"{self.num_rows} rows x {self.num_items} items")
        truth = self.truth(start, b).to(device)
        p0, p1 = self.indptr[start], self.indptr[start + b]
        pairs = None if p1 == p0 else (self.pairs[:, p0:p1].long() - torch.tensor([[start], [0]], device=device))
        return truth, truth >= 0, pairs

    def positions_dot(self, queries: Tensor, items: Tensor, keys_t: Tensor, start: int,
                      kmax: int) -> tuple[Tensor, Tensor]:
        """:meth:`positions` for scores ``queries [b, D] @ items.T`` (a dot-product model: the user rows, the item
        table ``[I, D]`` and its transpose ``keys_t`` ``[D, I]``), with the native kernels on CPU: the
        compare-and-count pass runs fused with the scoring (``dot_count``), so the ``[b, I]`` block is never written,
        and the held-out and excluded items' scores come from ``dot_pairs``, the same sums bit for bit. The scores
        are sums over ``d`` in order (they may differ from a BLAS GEMM's in the last bits). Elsewhere, or with more
        held-out items per row than counting handles: :meth:`positions` of ``queries @ keys_t``."""
        from rayrec.kernels import native

        lib = native()
        b = queries.shape[0]
        fused = (lib is not None and queries.device.type == "cpu" and keys_t.device.type == "cpu"
                 and queries.dtype == torch.float32 and keys_t.dtype == torch.float32)
        if not fused or (b and int(self.t_len[start : start + b].max()) > COUNT_MAX_HELDOUT):
            return self.positions(queries @ keys_t, start, kmax)
        truth, valid, pairs = self._block(start, b, keys_t.shape[1], queries.device)
        q = queries.contiguous()
        return _positions_by_count(lambda r, c: lib.dot_pairs(q, items, r, c),
                                   lambda th: lib.dot_count(q, keys_t, th.contiguous()), pairs, truth, valid,
                                   kmax), valid


def _masked_heldout_error(row: int, item: int) -> None:
    raise ValueError(
        f"held-out item {item} of row {row} is masked out; a held-out item must stay a candidate "
        "(check that the train/valid/test splits are disjoint)"
    )


def _unique_pairs(pairs: Tensor | None, num_items: int, t_key: Tensor) -> Tensor | None:
    """Excluded ``(row, item)`` pairs ``[2, nnz]`` without duplicates, sorted by row then item; raises if one is a
    held-out item (``t_key``: ``row * I + item`` of every held-out item, in row order)."""
    if pairs is None or pairs.shape[1] == 0:
        return None
    key = torch.unique(pairs[0] * num_items + pairs[1])  # sorted
    if t_key.numel():
        hit = torch.isin(t_key, key)
        if bool(hit.any()):
            k = int(t_key[hit][0])
            _masked_heldout_error(k // num_items, k % num_items)
    return torch.stack([key // num_items, key % num_items])


def _heldout_positions_by_count(scores: Tensor, pairs: Tensor | None, truth: Tensor, valid: Tensor,
                                kmax: int) -> Tensor:
    """``[B, H]`` pessimistic positions of the held-out items by counting, equal to :func:`_heldout_positions`'s
    at every cut-off ``<= kmax`` (positions beyond ``kmax`` are reported as ``kmax + 1``).

    For a held-out score ``s_h``: every item with ``not (s_i < s_h)`` (ties pessimistic; a NaN candidate counts,
    as it ranks above everything) is counted in one pass over the row, then the excluded ``pairs`` (unique, none of
    them held out) and the held-out items themselves are taken back out of the count, sparsely. Cost: one
    compare-and-count pass over ``[B, I]`` per held-out column and no ``[B, I]`` copy or top-k.
    """
    num_items = scores.shape[1]

    def not_below(th: Tensor) -> Tensor:  # [B, H] -> items with not (s_i < th), per row and column
        counted = torch.full(th.shape, num_items, dtype=torch.int64, device=scores.device)
        for h in range(th.shape[1]):
            for a in range(0, num_items, 32_767):  # int16 sums (3x faster than int64 on CPU), blocks that fit them
                below = scores[:, a : a + 32_767] < th[:, h : h + 1]  # [B, <=32767]
                counted[:, h] -= below.sum(dim=1, dtype=torch.int16)
        return counted

    return _positions_by_count(lambda r, c: scores[r, c], not_below, pairs, truth, valid, kmax)


def _positions_by_count(score_at, not_below, pairs: Tensor | None, truth: Tensor, valid: Tensor,
                        kmax: int) -> Tensor:
    """:func:`_heldout_positions_by_count` given ``score_at(rows [n], cols [n]) -> [n]`` (the scores of pairs) and
    ``not_below(th [B, H]) -> [B, H]`` (per row, the items whose score is not below each threshold): from a score
    block, or fused over dot-product tables (:meth:`HeldoutRanker.positions_dot`)."""
    B, H = truth.shape
    rows = torch.arange(B, device=truth.device).unsqueeze(1).expand(B, H)
    raw = score_at(rows.reshape(-1), truth.clamp(min=0).reshape(-1)).view(B, H)  # [B, H] held-out scores as they are
    th = torch.where(torch.isnan(raw), -torch.inf, raw)  # a NaN held-out item ranks below every candidate
    counted = not_below(th)  # [B, H] items not below s_h
    if pairs is not None:  # excluded items counted above
        hit = ~(score_at(pairs[0], pairs[1]).unsqueeze(1) < th[pairs[0]])  # [nnz, H]
        counted -= torch.zeros_like(counted).index_add_(0, pairs[0], hit.long())
    # held-out items counted above (each counts itself: not s_h < s_h, and a NaN one is counted like a NaN candidate)
    counted -= (~(raw.unsqueeze(1) < th.unsqueeze(2)) & valid.unsqueeze(1)).sum(dim=2)
    th = th.masked_fill(~valid, torch.nan)  # padding never counts as a held-out item ranked above another
    col = torch.arange(th.shape[1], device=th.device)
    before = ((th.unsqueeze(1) > th.unsqueeze(2)) | ((th.unsqueeze(1) == th.unsqueeze(2)) & (col < col.unsqueeze(1)))).sum(dim=2)
    return (1 + counted + before).clamp(max=kmax + 1)


def full_ranking_metrics(
    scores: Tensor,
    mask: Mask,
    truth: Tensor,
    ks: Sequence[int],
    *,
    mask_indptr: Tensor | None = None,
    mask_indices: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r"""Per-user Recall, NDCG and hit rate at each cutoff, ranking every unmasked item.

    For user :math:`u` with held-out items :math:`T_u`, unmasked candidates :math:`C_u` (all items minus the masked
    ones; :math:`T_u \subseteq C_u`) and scores :math:`s_{u,i}`, the position of :math:`h \in T_u` is pessimistic in
    ties (held-out items tied with each other are ordered by their column in ``truth``):

    .. math::
        p_{u,h} = 1 + \left|\{ i \in C_u : s_{u,i} > s_{u,h} \}\right|
                    + \left|\{ i \in C_u \setminus T_u : s_{u,i} = s_{u,h} \}\right|
                    + \left|\{ g \in T_u : s_{u,g} = s_{u,h},\ g \text{ before } h
                                \text{ in } \texttt{truth}_u \}\right|

    .. math::
        \mathrm{Recall@K}_u = \frac{\sum_{h \in T_u} \mathbb{1}[p_{u,h} \le K]}{|T_u|}, \qquad
        \mathrm{HR@K}_u = \mathbb{1}\left[\exists h \in T_u : p_{u,h} \le K\right]

    .. math::
        \mathrm{NDCG@K}_u = \frac{\sum_{h \in T_u} \mathbb{1}[p_{u,h} \le K] / \log_2(p_{u,h} + 1)}
                                 {\sum_{i=1}^{\min(|T_u|, K)} 1 / \log_2(i + 1)}

    Users with :math:`|T_u| = 0` get NaN for every metric. NaN scores: a NaN held-out item ranks below every
    candidate, a NaN candidate ranks above every held-out item.

    The row is never sorted and no ``[B, H, I]`` tensor is built. With at most ``COUNT_MAX_HELDOUT`` (2) held-out
    columns (leave-one-out) each position is counted in one compare-and-count pass over ``[B, I]``, the excluded
    items taken back out sparsely; with more, one top-``max(ks)`` over a masked ``[B, I]`` copy serves every column
    (memory :math:`O(B \cdot I)`, about 2.5x the size of a float32 ``scores`` block plus ``scores`` itself; see
    :func:`chunk_size_for`). Both give the same metrics.

    Args:
        scores: ``[B, I]`` float scores of every item for each user of the chunk. Not modified.
        mask: the items to exclude from each user's candidates (train items, and valid items when testing), either
            a bool ``[B, I]`` tensor (True = exclude) or a CSR pair ``(indptr [B + 1], indices [nnz])`` with rows
            aligned with the ``B`` users, or ``None``. In the CSR form row ``r`` owns
            ``indices[indptr[r]:indptr[r+1]]``, so a row range ``indptr[a:b+1]`` of a bigger CSR can be passed with
            its full ``indices`` unchanged; duplicates are harmless.
        truth: ``[B, H]`` integer held-out item ids per user, padded with ``-1`` (anywhere in the row). An id may
            appear at most once per row.
        ks: cutoffs :math:`K` (positive ints).
        mask_indptr: keyword alternative to a CSR ``mask`` (then ``mask`` must be ``None``).
        mask_indices: keyword alternative to a CSR ``mask``, with ``mask_indptr``.
        chunk_size: if given, process at most this many rows at a time (bounds the temporaries; ``scores`` itself is
            already materialised by the caller). The result is identical to the unchunked one.

    Returns:
        ``{"Recall@K": [B], "NDCG@K": [B], "HR@K": [B]}`` for every K in ``ks``, float32 (NaN for users without
        held-out items).

    Raises:
        ValueError: bad shapes/ids, a held-out id listed twice in a row, or a held-out item that is masked.
    """
    ks = _check_ks(ks)
    _check_scores(scores)
    num_rows = scores.shape[0]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size is None or chunk_size >= num_rows:
        return _full_ranking_block(scores, mask, truth, ks, mask_indptr, mask_indices)

    if isinstance(mask, (tuple, list)):
        if mask_indptr is not None or mask_indices is not None:
            raise ValueError("give the mask either positionally or as mask_indptr/mask_indices, not both")
        if len(mask) != 2:
            raise ValueError("a CSR mask must be an (indptr, indices) pair")
        mask_indptr, mask_indices = mask
        mask = None

    truth = torch.as_tensor(truth)
    if truth.dim() != 2 or truth.shape[0] != num_rows:
        raise ValueError(f"truth must have shape [B, H] with B = {num_rows}, got {tuple(truth.shape)}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != num_rows):
        raise ValueError(f"mask must have shape [B, I] with B = {num_rows}, got {tuple(mask.shape)}")
    if mask_indptr is not None:
        mask_indptr = torch.as_tensor(mask_indptr)
        if mask_indptr.dim() != 1 or mask_indptr.numel() != num_rows + 1:
            raise ValueError(
                f"mask_indptr must have shape [B + 1] = [{num_rows + 1}], got {tuple(mask_indptr.shape)}"
            )
    parts: list[dict[str, Tensor]] = []
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        parts.append(
            _full_ranking_block(
                scores[start:stop],
                None if mask is None else mask[start:stop],
                truth[start:stop],
                ks,
                None if mask_indptr is None else mask_indptr[start : stop + 1],
                mask_indices,
            )
        )
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def masked_topk(
    scores: Tensor,
    mask: Mask,
    k: int,
    *,
    mask_indptr: Tensor | None = None,
    mask_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Top-:math:`K` recommendation lists with masked items removed.

    .. math::
        \mathrm{top}_K(u) = \operatorname*{arg\,top\text{-}K}_{i \in C_u} s_{u,i}

    Masked items get score :math:`-\infty` (and so does a NaN score) before :func:`torch.topk`; if :math:`K`
    exceeds the number of candidates the tail of a row holds such :math:`-\infty` entries, which the caller should
    drop. The order among tied scores is whatever ``torch.topk`` gives (not the pessimistic rule of
    :func:`full_ranking_metrics`) -- use that function for metrics.

    Args:
        scores: ``[B, I]`` float scores. Not modified.
        mask: bool ``[B, I]`` (True = exclude), CSR pair ``(indptr [B + 1], indices [nnz])`` or ``None``
            (see :func:`full_ranking_metrics`).
        k: list length, ``1 <= k <= I``.
        mask_indptr: keyword alternative to a CSR ``mask``.
        mask_indices: keyword alternative to a CSR ``mask``.

    Returns:
        ``(values [B, k], indices [B, k])``, best first; ``values`` are the masked scores (``-inf`` where masked).
    """
    _check_scores(scores)
    num_rows, num_items = scores.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_items:
        raise ValueError(f"k must be an int in [1, I] = [1, {num_items}], got {k!r}")
    exclude = _build_mask(num_rows, num_items, scores.device, mask, mask_indptr, mask_indices)
    masked = torch.where(torch.isnan(scores), -torch.inf, scores)
    if exclude is not None:
        masked.masked_fill_(exclude, -torch.inf)
    return torch.topk(masked, k, dim=1, largest=True, sorted=True)


def chunk_size_for(num_items: int, memory_budget_mb: int, bytes_per_score: int = 4, overhead: int = 4) -> int:
    r"""Rows of users per chunk so that a ``[B, I]`` score block, times an overhead factor, fits a memory budget.

    .. math::
        B = \max\left(1, \left\lfloor \frac{\text{budget} \cdot 2^{20}}{I \cdot \text{bytes\_per\_score}
            \cdot \text{overhead}} \right\rfloor\right)

    ``memory_budget_mb`` is in MiB. The default ``overhead = 4`` covers :func:`full_ranking_metrics` on a float32
    block: the scores themselves, its candidate copy, and three bool ``[B, I]`` tensors.

    Args:
        num_items: :math:`I`, items per row.
        memory_budget_mb: budget in MiB for one chunk.
        bytes_per_score: bytes of one score (4 for float32, 2 for bf16/fp16, 8 for float64).
        overhead: multiplier for the temporaries built alongside the block.

    Returns:
        Rows per chunk, at least 1.
    """
    for name, value in (
        ("num_items", num_items),
        ("memory_budget_mb", memory_budget_mb),
        ("bytes_per_score", bytes_per_score),
        ("overhead", overhead),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    per_row = num_items * bytes_per_score * overhead
    return max(1, int(memory_budget_mb * 2**20 // per_row))


def select_csr_rows(indptr: Tensor, indices: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    r"""Sub-CSR of the given rows, in the given order (e.g. a chunk of users' train items from the global CSR).

    .. math::
        \texttt{out\_indptr}_0 = 0, \quad
        \texttt{out\_indptr}_{j+1} = \texttt{out\_indptr}_j + (\texttt{indptr}_{r_j + 1} - \texttt{indptr}_{r_j})

    Args:
        indptr: ``[R + 1]`` row pointers of the source CSR (R rows, e.g. all users).
        indices: ``[nnz]`` column ids of the source CSR.
        rows: ``[B]`` row ids to take (repeats allowed).

    Returns:
        ``(indptr [B + 1], indices [nnz_B])`` int64, on ``indices``' device, ready for ``mask_indptr``/
        ``mask_indices``.
    """
    indptr = torch.as_tensor(indptr).to(torch.int64)
    indices = torch.as_tensor(indices).to(torch.int64)
    rows = torch.as_tensor(rows).to(device=indptr.device, dtype=torch.int64)
    if indptr.dim() != 1 or indptr.numel() < 1 or indices.dim() != 1 or rows.dim() != 1:
        raise ValueError("indptr [R + 1], indices [nnz] and rows [B] must be 1-D (indptr non-empty)")
    num_src = indptr.numel() - 1
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_src):
        raise ValueError(f"rows must lie in [0, {num_src}), got [{int(rows.min())}, {int(rows.max())}]")
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    out_indptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=indptr.device)
    torch.cumsum(counts, 0, out=out_indptr[1:])
    total = int(out_indptr[-1])
    offsets = torch.arange(total, device=indptr.device) - torch.repeat_interleave(out_indptr[:-1], counts)
    gather = torch.repeat_interleave(starts, counts) + offsets
    return out_indptr.to(indices.device), indices[gather.to(indices.device)]
