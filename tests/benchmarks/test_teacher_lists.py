"""benchmarks/teacher_lists.py: concentration and personalisation of a teacher's top lists, on hand-made lists."""

import numpy as np
import pytest


def test_list_stats_counts_concentration_and_overlap():
    from benchmarks.teacher_lists import list_stats

    same = np.tile(np.arange(40), (50, 1))  # every user gets the same 40 items
    s = list_stats(same, num_items=1000, top=40)
    assert s["distinct_items"] == 40 and s["top100_share"] == 1.0 and s["pair_overlap_at_10"] == 1.0
    disjoint = np.arange(50 * 40).reshape(50, 40)  # nobody shares an item
    d = list_stats(disjoint, num_items=2000, top=40)
    assert d["distinct_items"] == 2000 and d["pair_overlap_at_10"] == 0.0
    assert d["top100_share"] == pytest.approx(100 / 2000) and d["top1000_share"] == pytest.approx(1000 / 2000)
    short = disjoint.copy()
    short[:, 20:] = -1  # lists shorter than `top`: the padding is not an item
    assert list_stats(short, num_items=2000, top=40)["distinct_items"] == 1000
