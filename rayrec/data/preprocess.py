"""Vectorised preprocessing of raw :class:`~rayrec.data.readers.Interactions`: binarise, dedup, k-core, remap.

Every function returns rows in their input (file) order, so the order-dependent steps downstream
(``remap``'s first-appearance ids, ``order="file"`` splits, time-tie breaking) see the file as written.

The DE-RRD CiteULike-t pipeline is ``kcore(read_users_dat(...), min_user=5, min_item=0)`` then ``remap``:
5,219 users, 25,181 items, 125,580 interactions.
"""

from __future__ import annotations

import numpy as np

from rayrec.data.readers import Interactions
from rayrec.errors import ConfigError

__all__ = ["binarise", "dedup", "kcore", "remap"]


def binarise(inter: Interactions, threshold: float | None) -> Interactions:
    """Keep rows with ``rating >= threshold`` (implicit feedback); ``None`` keeps every row.

    The ``rating`` column is kept (filtered) for reference; downstream code treats every row as a positive.
    """
    if threshold is None:
        return inter
    if inter.rating is None:
        raise ConfigError(
            f"data.rating_threshold={threshold} is set but the data has no ratings (implicit data); set it to null"
        )
    return inter.take(inter.rating >= threshold)


def dedup(inter: Interactions) -> Interactions:
    """Drop repeated (user, item) pairs, keeping the first occurrence **in file order**.

    File order (not the earliest timestamp) is used so the result does not depend on whether timestamps exist;
    the kept row keeps its own rating and timestamp. Row order of the survivors is unchanged.
    """
    n = len(inter)
    if n == 0:
        return inter
    order = np.lexsort((inter.item, inter.user))  # [N] by (user, item); stable, so ties stay in file order
    u, i = inter.user[order], inter.item[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])  # first row of each (user, item) group
    if first.all():
        return inter
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    return inter.take(keep)


def kcore(inter: Interactions, min_user: int = 0, min_item: int = 0) -> Interactions:
    """Iterated k-core: drop rows whose user has < ``min_user`` or item has < ``min_item`` rows, to a fixed point.

    0 or 1 switches a side off. The result (the unique maximal sub-table meeting both bounds) does not depend on
    the removal order. Counts are of rows, so run :func:`dedup` first for counts of distinct items.
    """
    if min_user <= 1 and min_item <= 1:
        return inter
    _, ucode = np.unique(inter.user, return_inverse=True)  # [N] dense user codes (raw ids may be huge)
    _, icode = np.unique(inter.item, return_inverse=True)  # [N]
    keep = np.ones(len(inter), dtype=bool)
    while True:
        ucount = np.bincount(ucode[keep], minlength=int(ucode.max(initial=-1)) + 1)  # [U_raw]
        icount = np.bincount(icode[keep], minlength=int(icode.max(initial=-1)) + 1)  # [I_raw]
        ok = keep & (ucount[ucode] >= min_user) & (icount[icode] >= min_item)
        if (ok == keep).all():
            break
        keep = ok
    return inter.take(keep)


def _first_appearance_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous ids ``[N]`` numbered by first appearance, and the raw id of each new id ``[K]``."""
    uniq, first, inv = np.unique(raw, return_index=True, return_inverse=True)  # [K], [K], [N]
    by_first = np.argsort(first, kind="stable")  # [K] unique index in order of first appearance
    new_of_uniq = np.empty(len(uniq), dtype=np.int64)
    new_of_uniq[by_first] = np.arange(len(uniq), dtype=np.int64)
    return new_of_uniq[inv.reshape(-1)], uniq[by_first].astype(np.int64)


def remap(inter: Interactions) -> tuple[Interactions, np.ndarray, np.ndarray]:
    """Renumber users and items ``0..U-1`` / ``0..I-1`` by first appearance in row (file) order.

    Returns ``(remapped, user_raw [U], item_raw [I])`` with ``user_raw[new_id] = raw_id`` (same for items).
    """
    user, user_raw = _first_appearance_ids(inter.user)
    item, item_raw = _first_appearance_ids(inter.item)
    return Interactions(user=user, item=item, rating=inter.rating, timestamp=inter.timestamp), user_raw, item_raw
