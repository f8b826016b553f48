"""Hold-out splits and fixed evaluation negatives, on remapped (contiguous) ids.

Three ways to split (U users, I items, N interactions):

* :func:`leave_one_out` - per user one valid and one test item (DE-RRD's protocol), the rest is train.
* :func:`ratio_split` - per user, in file / random / time order: the first ``max(floor(r0*n), 1)`` rows train,
  the next rows up to ``max(floor((r0+r1)*n), train_end)`` valid, the rest test (the MKD protocol).
* :func:`load_derrd_split` - DE-RRD's published CiteULike-t split, loaded as given.

:func:`sample_eval_negatives` then draws, once and seeded, ``n`` items per user that the user never interacted
with (train, valid or test): the candidates of the sampled ranking protocol (held-out item + 499 negatives).

Per-user orders are computed with one ``np.lexsort`` over all rows (no Python loop over users); ``pos`` below is a
row's 0-based position inside its user's ordered group and ``n`` the group size::

    user   0  0  0  0  0  1  1  1        (rows sorted by user, then by the order key)
    pos    0  1  2  3  4  0  1  2
    n      5  5  5  5  5  3  3  3
    LOO    T  T  T  V  E  T  V  E        (T train, V valid, E test)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from rayrec.data.readers import Interactions, iter_lines, read_tsv_pairs
from rayrec.errors import DataFormatError, SplitError

__all__ = [
    "Split",
    "leave_one_out",
    "ratio_split",
    "load_derrd_split",
    "user_items_csr",
    "sample_eval_negatives",
]


@dataclass
class Split:
    """Train / valid / test interactions over ids ``0..num_users-1`` and ``0..num_items-1`` (rows in file order)."""

    train: Interactions
    valid: Interactions
    test: Interactions
    num_users: int
    num_items: int

    def users_without(self, part: Literal["train", "valid", "test"]) -> int:
        """Number of users with at least one interaction overall but none in ``part``."""
        has_any = np.zeros(self.num_users, dtype=bool)
        for p in (self.train, self.valid, self.test):
            has_any[p.user] = True
        has_part = np.zeros(self.num_users, dtype=bool)
        has_part[getattr(self, part).user] = True
        return int((has_any & ~has_part).sum())


def _name_user(u: int, user_raw: np.ndarray | None) -> str:
    return f"user {int(user_raw[u])} (raw id; remapped id {u})" if user_raw is not None else f"user {u}"


def _grouped(
    inter: Interactions, num_users: int, order: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (user, order key): ``perm [N]``, and per sorted row ``pos [N]``, ``n [N]``; ``counts [U]``."""
    N = len(inter)
    if N and (inter.user.min() < 0 or inter.user.max() >= num_users):
        raise SplitError(
            f"user ids must lie in [0, {num_users}) (remap first); got [{inter.user.min()}, {inter.user.max()}]"
        )
    row = np.arange(N, dtype=np.int64)  # [N] file position: the final tie-breaker everywhere
    if order == "file":
        perm = np.lexsort((row, inter.user))
    elif order == "random":
        key = np.random.default_rng(seed).permutation(N)  # [N] distinct random ranks
        perm = np.lexsort((key, inter.user))
    elif order == "time":
        if inter.timestamp is None:
            raise SplitError("order='time' needs timestamps, but the data has none (use order='random' or 'file')")
        perm = np.lexsort((row, inter.timestamp, inter.user))  # equal timestamps: later in the file = later
    else:
        raise SplitError(f"unknown order {order!r} (expected 'random', 'time' or 'file')")
    counts = np.bincount(inter.user, minlength=num_users)  # [U]
    starts = np.cumsum(counts) - counts  # [U] first sorted row of each user
    u_sorted = inter.user[perm]  # [N]
    pos = row - starts[u_sorted]  # [N]
    return perm, pos, counts[u_sorted], counts


def _assemble(inter: Interactions, perm: np.ndarray, role_sorted: np.ndarray, num_users: int, num_items: int) -> Split:
    role = np.empty(len(inter), dtype=np.int8)
    role[perm] = role_sorted  # [N] back to file order: 0 train, 1 valid, 2 test
    return Split(
        train=inter.take(role == 0),
        valid=inter.take(role == 1),
        test=inter.take(role == 2),
        num_users=num_users,
        num_items=num_items,
    )


def _num_items(inter: Interactions, num_items: int | None) -> int:
    return int(inter.item.max(initial=-1)) + 1 if num_items is None else num_items


def leave_one_out(
    inter: Interactions,
    num_users: int,
    order: Literal["random", "time", "file"] = "random",
    seed: int = 0,
    *,
    num_items: int | None = None,
    user_raw: np.ndarray | None = None,
) -> Split:
    """One valid and one test interaction per user; the rest train.

    ``order``: "random" (seeded: two random rows held out), "time" (test = latest timestamp, valid = second
    latest; equal timestamps: the later row in the file counts as later) or "file" (the last two rows of the user
    in the file). Every user with interactions needs at least 3 (1 train + 1 valid + 1 test); otherwise
    :class:`SplitError` names the first such user by raw id (``user_raw [U]`` maps remapped -> raw ids).
    """
    perm, pos, n, counts = _grouped(inter, num_users, order, seed)
    few = np.flatnonzero((counts > 0) & (counts < 3))
    if len(few):
        u = int(few[0])
        raise SplitError(
            f"{_name_user(u, user_raw)} has {counts[u]} interaction(s): leave-one-out needs >= 3 (one train, one "
            f"valid, one test), it would have no training item ({len(few)} such users). "
            "Set data.min_user_interactions >= 3."
        )
    role = np.zeros(len(inter), dtype=np.int8)  # [N] sorted order
    role[pos == n - 2] = 1
    role[pos == n - 1] = 2
    return _assemble(inter, perm, role, num_users, _num_items(inter, num_items))


def ratio_split(
    inter: Interactions,
    ratios: tuple[float, float, float] | list[float] = (0.8, 0.1, 0.1),
    order: Literal["file", "random", "time"] = "file",
    seed: int = 0,
    *,
    num_users: int | None = None,
    num_items: int | None = None,
) -> Split:
    """Per user (n rows, taken in ``order``): train = first ``max(floor(r0*n), 1)``, valid = next rows up to
    ``max(floor((r0+r1)*n), train_end)``, test = the rest. Users with few rows may get no valid / test row.

    CiteULike-t (users >= 5, file order, 0.8/0.1/0.1): 98,405 / 12,451 / 14,724 rows, 701 users without valid.
    """
    r0, r1, r2 = (float(r) for r in ratios)
    if min(r0, r1, r2) < 0 or abs(r0 + r1 + r2 - 1.0) > 1e-6:
        raise SplitError(f"ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    U = int(inter.user.max(initial=-1)) + 1 if num_users is None else num_users
    perm, pos, n, _ = _grouped(inter, U, order, seed)
    train_end = np.maximum(np.floor(r0 * n), 1).astype(np.int64)  # [N]
    valid_end = np.maximum(np.floor((r0 + r1) * n).astype(np.int64), train_end)  # [N]
    role = np.where(pos < train_end, 0, np.where(pos < valid_end, 1, 2)).astype(np.int8)  # [N]
    return _assemble(inter, perm, role, U, _num_items(inter, num_items))


# --------------------------------------------------------------------------------------------- DE-RRD split
def _read_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataFormatError(path, None, "missing: expected 'user_count<TAB>U' and 'item_count<TAB>I' lines")
    out: dict[str, int] = {}
    for ln, line in iter_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("user_count", "item_count"):
            raise DataFormatError(path, ln, f"expected 'user_count <int>' or 'item_count <int>', got {line[:80]!r}")
        if not parts[1].isdigit() or int(parts[1]) <= 0:
            raise DataFormatError(path, ln, f"{parts[0]} {parts[1]!r} is not a positive integer")
        out[parts[0]] = int(parts[1])
    for need in ("user_count", "item_count"):
        if need not in out:
            raise DataFormatError(path, None, f"no '{need}' line")
    return out


def load_derrd_split(directory: str | Path) -> Split:
    """DE-RRD's published split: ``train.tsv``, ``valid.tsv``, ``test.tsv`` (``user<TAB>item``) and ``counts.txt``.

    Ids are used unchanged. ``num_users`` / ``num_items`` come from ``counts.txt`` (CiteULike-t: 5220 / 25182,
    one more than the ids in use: the phantom id is kept so parameter counts match the paper).
    CiteULike-t seed 0: 115,142 train rows, 5,219 valid and 5,219 test rows.
    """
    d = Path(directory)
    counts = _read_counts(d / "counts.txt")
    U, I = counts["user_count"], counts["item_count"]
    parts: dict[str, Interactions] = {}
    for name in ("train", "valid", "test"):
        path = d / f"{name}.tsv"
        inter = read_tsv_pairs(path)
        for col, bound, what in ((inter.user, U, "user_count"), (inter.item, I, "item_count")):
            bad = np.flatnonzero(col >= bound)
            if len(bad):
                r = int(bad[0])
                raise DataFormatError(path, None, f"data row {r + 1}: id {col[r]} >= {what} {bound} of counts.txt")
        parts[name] = inter
    # the three files must not share a (user, item) pair
    all_u = np.concatenate([p.user for p in parts.values()])
    all_i = np.concatenate([p.item for p in parts.values()])
    key = np.sort(all_u * I + all_i)  # [N]
    dup = np.flatnonzero(key[1:] == key[:-1])
    if len(dup):
        k = int(key[dup[0]])
        raise SplitError(f"{d}: pair (user {k // I}, item {k % I}) appears more than once across train/valid/test")
    return Split(train=parts["train"], valid=parts["valid"], test=parts["test"], num_users=U, num_items=I)


# --------------------------------------------------------------------------------------------- negatives
def user_items_csr(user: np.ndarray, item: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the (user, item) pairs: ``indptr [U+1]``, ``indices [nnz]`` sorted and de-duplicated per user."""
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    order = np.lexsort((item, user))
    u, i = user[order], item[order]
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i = u[keep], i[keep]
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=num_users), out=indptr[1:])
    return indptr, i


_BLOCK = 1 << 22  # random draws per chunk (bounds the [C, m] working arrays to ~32 MB each)
_BITMAP_BYTES = 1 << 26  # per-chunk [C * I] membership bitmap budget (64 MB)
_BITMAP_MAX_ITEMS = 1 << 20  # above this catalogue size chunks would be tiny: use searchsorted instead


def sample_eval_negatives(
    csr: tuple[np.ndarray, np.ndarray],
    num_items: int,
    n: int = 499,
    seed: int = 0,
    *,
    user_raw: np.ndarray | None = None,
) -> np.ndarray:
    """``n`` distinct items per user, uniform among the items the user never interacted with; ``[U, n]`` int64.

    ``csr = (indptr [U+1], indices [nnz])`` must hold *all* the user's interactions (train + valid + test), e.g.
    from :func:`user_items_csr`. Each row is sorted ascending. The result is fixed by ``(data, n, seed)``.
    Users without held-out items still get a row. A user with fewer than ``n`` non-interacted items raises
    :class:`SplitError`.

    Sparse users (at most half the catalogue interacted, at least 4n items free) use vectorised rejection
    sampling per chunk of users: draw ``m`` ids per user, reject interacted ones (``searchsorted`` in the sorted
    ``user * I + item`` keys) and repeats, then keep ``n`` survivors chosen at random (rows that fell short are
    redrawn wider). Conditional on the survivor set this is a uniform ``n``-subset of it, hence uniform over the
    user's free items. Dense users use exact random-key selection over the whole catalogue (``[C, I]`` keys,
    interacted items set to +inf, ``argpartition``).
    """
    indptr, indices = (np.asarray(a, dtype=np.int64) for a in csr)
    U, I = len(indptr) - 1, int(num_items)
    out = np.empty((U, n), dtype=np.int64)  # [U, n]
    if n == 0 or U == 0:
        return out
    deg = np.diff(indptr)  # [U]
    free = I - deg  # [U] non-interacted items (indices are unique per user)
    short = np.flatnonzero(free < n)
    if len(short):
        u = int(short[0])
        raise SplitError(
            f"{_name_user(u, user_raw)} has only {free[u]} non-interacted items of {I}, fewer than the "
            f"{n} evaluation negatives asked for ({len(short)} such users); lower data.num_eval_negatives"
        )
    keys = np.repeat(np.arange(U, dtype=np.int64), deg) * I + indices  # [nnz] sorted (CSR order)
    dense = (free < 4 * n) | (2 * deg > I)  # [U]

    # --- sparse users: rejection sampling, C users x m draws per chunk
    sparse_users = np.flatnonzero(~dense)
    base = 1.25 * n + 32  # draws needed per user when nothing is rejected (slack for repeats + variance)
    chunk = max(1, _BLOCK // int(2 * base + 1))  # rows per chunk; free >= I/2 bounds m by 2*base
    bitmap = I <= _BITMAP_MAX_ITEMS  # membership by a [C * I] bitmap (fast) or searchsorted in sorted keys
    if bitmap:
        chunk = max(1, min(chunk, _BITMAP_BYTES // I))
    for c, lo in enumerate(range(0, len(sparse_users), chunk)):
        us = sparse_users[lo : lo + chunk]  # [C]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, c]))
        m = int(math.ceil(base * I / int(free[us].min())))
        if bitmap:
            mark = np.zeros(len(us) * I, dtype=bool)  # [C * I] interacted (local row, item)
            mark[np.repeat(np.arange(len(us)) * I, deg[us]) + indices[_ranges(indptr[us], deg[us])]] = True

            def interacted(rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
                return mark[rows[:, None] * I + cand]
        else:
            ckeys = keys[indptr[us[0]] : indptr[us[-1] + 1]]  # the chunk's users are sorted: one slice of keys

            def interacted(rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
                k = us[rows][:, None] * I + cand  # [C, m]
                return ckeys[np.minimum(np.searchsorted(ckeys, k), len(ckeys) - 1)] == k if len(ckeys) else k < 0

        todo = np.arange(len(us))  # local rows still to fill
        while len(todo):
            rows, ok = _reject_rows(rng, todo, interacted, I, n, m)  # [C_ok, n], [C_todo]
            out[us[todo[ok]]] = rows
            todo = todo[~ok]
            m *= 2

    # --- dense users: exact random keys over the catalogue
    dense_users = np.flatnonzero(dense)
    chunk = max(1, _BLOCK // I)
    for c, lo in enumerate(range(0, len(dense_users), chunk)):
        us = dense_users[lo : lo + chunk]  # [C]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, c]))
        r = rng.random((len(us), I))  # [C, I]
        row = np.repeat(np.arange(len(us)), deg[us])  # [nnz_chunk]
        col = indices[_ranges(indptr[us], deg[us])]  # [nnz_chunk] the chunk's interacted items
        r[row, col] = np.inf  # interacted items are never among the n smallest (free >= n)
        pick = np.argpartition(r, n - 1, axis=1)[:, :n]  # [C, n]
        out[us] = np.sort(pick, axis=1)
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for each (s, l), vectorised: ``[sum(lens)]``."""
    total = int(lens.sum())
    offsets = np.cumsum(lens) - lens  # [C] where each range begins in the output
    return np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)


def _reject_rows(
    rng: np.random.Generator,
    rows: np.ndarray,
    interacted: Callable[[np.ndarray, np.ndarray], np.ndarray],
    I: int,
    n: int,
    m: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted negatives ``[C_ok, n]`` for chunk rows ``rows [C]`` and the mask ``[C]`` of rows that got ``n`` items."""
    C = len(rows)
    cand = rng.integers(0, I, size=(C, m), dtype=np.int64)  # [C, m]
    hit = interacted(rows, cand)  # [C, m]
    s = np.sort(np.where(hit, I, cand), axis=1)  # [C, m] interacted -> sentinel I (sorts last)
    s[:, 1:][s[:, 1:] == s[:, :-1]] = I  # repeats -> sentinel
    alive = s < I  # [C, m]
    ok = alive.sum(axis=1) >= n  # [C]
    score = rng.random((C, m))  # [C, m] random choice of n survivors
    score[~alive] = 2.0
    pick = np.sort(np.argpartition(score, n - 1, axis=1)[:, :n], axis=1)  # [C, n] s is sorted: so is the result
    return np.take_along_axis(s, pick, axis=1)[ok], ok
