"""binarise / dedup / kcore / remap on hand-made tables, against loop references, and the CiteULike-t counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rayrec.data.preprocess import binarise, dedup, kcore, remap
from rayrec.data.readers import Interactions, read_users_dat
from rayrec.errors import ConfigError


def _inter(user, item, rating=None, timestamp=None) -> Interactions:
    return Interactions(user=np.array(user), item=np.array(item), rating=rating, timestamp=timestamp)


def test_binarise():
    x = _inter([1, 1, 2, 3], [5, 6, 5, 7], rating=np.array([4.0, 3.5, 5.0, 1.0]))
    y = binarise(x, 4.0)
    np.testing.assert_array_equal(y.user, [1, 2])
    np.testing.assert_array_equal(y.item, [5, 5])
    assert binarise(x, None) is x
    with pytest.raises(ConfigError, match="no ratings"):
        binarise(_inter([1], [2]), 4.0)


def test_dedup_keeps_first_in_file_order():
    ts = np.array([50, 10, 20, 30, 40])
    x = _inter([1, 2, 1, 1, 2], [9, 9, 9, 8, 9], timestamp=ts)
    y = dedup(x)
    np.testing.assert_array_equal(y.user, [1, 2, 1])  # survivors keep file order
    np.testing.assert_array_equal(y.item, [9, 9, 8])
    np.testing.assert_array_equal(y.timestamp, [50, 10, 30])  # first row's timestamp, not the earliest (20)


def _kcore_reference(pairs: list[tuple[int, int]], mu: int, mi: int) -> list[tuple[int, int]]:
    while True:
        uc: dict[int, int] = {}
        ic: dict[int, int] = {}
        for u, i in pairs:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [(u, i) for u, i in pairs if uc[u] >= mu and ic[i] >= mi]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


def test_kcore_iterates_to_a_fixed_point():
    # user 3 has 2 items; removing it drops item 30 to 1 user, which drops user 2 to 1 item, ...
    x = _inter([1, 1, 2, 2, 3, 3, 4, 4], [10, 20, 10, 30, 30, 40, 10, 20])
    y = kcore(x, min_user=2, min_item=2)
    ref = _kcore_reference(list(zip(x.user.tolist(), x.item.tolist())), 2, 2)
    assert sorted(zip(y.user.tolist(), y.item.tolist())) == sorted(ref)
    assert set(y.user.tolist()) == {1, 4}
    assert kcore(x, 0, 1) is x


@pytest.mark.parametrize("mu, mi", [(3, 0), (0, 3), (3, 3), (5, 2)])
def test_kcore_matches_reference_on_random_data(mu, mi):
    rng = np.random.default_rng(mu * 10 + mi)
    u = rng.integers(0, 60, 600) * 1_000_003  # large, sparse raw ids
    i = rng.zipf(1.5, 600) % 80
    y = kcore(dedup(_inter(u, i)), mu, mi)
    ref = _kcore_reference(list(dict.fromkeys(zip(u.tolist(), i.tolist()))), mu, mi)
    assert list(zip(y.user.tolist(), y.item.tolist())) == ref  # same rows, same (file) order
    if len(y):
        assert np.bincount(np.unique(y.user, return_inverse=True)[1]).min() >= mu
        assert np.bincount(np.unique(y.item, return_inverse=True)[1]).min() >= mi


def test_remap_first_appearance_and_traceability():
    x = _inter([70, 50, 70, 90, 50], [3, 8, 8, 1, 3], timestamp=np.arange(5))
    y, user_raw, item_raw = remap(x)
    np.testing.assert_array_equal(y.user, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(y.item, [0, 1, 1, 2, 0])
    np.testing.assert_array_equal(user_raw, [70, 50, 90])
    np.testing.assert_array_equal(item_raw, [3, 8, 1])
    np.testing.assert_array_equal(user_raw[y.user], x.user)  # raw ids recovered
    np.testing.assert_array_equal(item_raw[y.item], x.item)
    np.testing.assert_array_equal(y.timestamp, x.timestamp)


def test_citeulike_users_ge_5(data_root: Path):
    raw = read_users_dat(data_root / "citeulike-t" / "users.dat")
    x = kcore(dedup(raw), min_user=5, min_item=0)
    y, user_raw, item_raw = remap(x)
    assert (len(user_raw), len(item_raw), len(y)) == (5_219, 25_181, 125_580)
    assert y.user.max() == 5_218 and y.item.max() == 25_180
    assert (np.bincount(y.user) >= 5).all()
