"""Integer key helpers for the pair sets (user x item) built from interactions and teacher lists."""

from __future__ import annotations

import numpy as np


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer array (``np.unique(keys)``), by one sort and a neighbour compare.
    numpy 2.4's ``np.unique`` took 3.5 s of CPU on 2.7M int64 keys spread over 1.3e8 values (CiteULike's train
    pairs + teacher top-500 lists, RRD's start-up); this takes 0.16 s."""
    s = np.sort(np.asarray(keys).ravel())
    if len(s) == 0:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
