"""Leave-one-out, ratio and DE-RRD splits; fixed evaluation negatives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rayrec.data import splits as S
from rayrec.data.preprocess import dedup, kcore, remap
from rayrec.data.readers import Interactions, read_users_dat
from rayrec.data.splits import (
    leave_one_out,
    load_derrd_split,
    ratio_split,
    sample_eval_negatives,
    user_items_csr,
)
from rayrec.errors import DataFormatError, SplitError


@pytest.fixture(scope="module")
def citeulike(shared_root: Path) -> tuple[Interactions, np.ndarray, np.ndarray]:
    x = kcore(dedup(read_users_dat(shared_root / "citeulike-t" / "users.dat")), 5, 0)
    return remap(x)


def _pairs(x: Interactions) -> set[tuple[int, int]]:
    return set(zip(x.user.tolist(), x.item.tolist()))


def _random_inter(U=40, I=200, per_user=(3, 30), seed=0, timestamps=False) -> Interactions:
    rng = np.random.default_rng(seed)
    n = rng.integers(*per_user, size=U)
    user = np.repeat(np.arange(U), n)
    item = np.concatenate([rng.choice(I, k, replace=False) for k in n])
    perm = rng.permutation(len(user))  # interleave users in "file" order
    ts = rng.integers(0, 50, len(user)) if timestamps else None  # many ties
    return Interactions(user=user[perm], item=item[perm], timestamp=None if ts is None else ts)


# --------------------------------------------------------------------------------------------- leave-one-out
def test_loo_random_one_valid_one_test_per_user():
    x = _random_inter()
    s = leave_one_out(x, 40, "random", seed=3)
    np.testing.assert_array_equal(np.bincount(s.valid.user, minlength=40), 1)
    np.testing.assert_array_equal(np.bincount(s.test.user, minlength=40), 1)
    assert len(s.train) + len(s.valid) + len(s.test) == len(x)
    assert _pairs(s.train) | _pairs(s.valid) | _pairs(s.test) == _pairs(x)
    assert not (_pairs(s.train) & (_pairs(s.valid) | _pairs(s.test)))
    again = leave_one_out(x, 40, "random", seed=3)
    np.testing.assert_array_equal(again.test.item, s.test.item)
    other = leave_one_out(x, 40, "random", seed=4)
    assert not np.array_equal(other.test.item, s.test.item)


def test_loo_time_latest_is_test_ties_by_file_order():
    #            rows: 0   1   2   3   4   5   6
    x = Interactions(user=np.array([0, 0, 0, 0, 1, 1, 1]), item=np.array([1, 2, 3, 4, 1, 2, 3]),
                     timestamp=np.array([5, 9, 9, 1, 3, 2, 1]))
    s = leave_one_out(x, 2, "time")
    # user 0: items 2 and 3 tie at t=9; item 3 is later in the file -> test, item 2 -> valid
    assert dict(zip(s.test.user.tolist(), s.test.item.tolist())) == {0: 3, 1: 1}
    assert dict(zip(s.valid.user.tolist(), s.valid.item.tolist())) == {0: 2, 1: 2}
    np.testing.assert_array_equal(s.train.item, [1, 4, 3])  # file order kept
    f = leave_one_out(x, 2, "file")
    assert dict(zip(f.test.user.tolist(), f.test.item.tolist())) == {0: 4, 1: 3}


def test_loo_time_needs_timestamps():
    with pytest.raises(SplitError, match="timestamps"):
        leave_one_out(_random_inter(), 40, "time")


def test_loo_user_without_training_item_names_raw_id():
    x = Interactions(user=np.array([0, 0, 0, 1, 1]), item=np.array([0, 1, 2, 0, 1]))
    with pytest.raises(SplitError) as ei:
        leave_one_out(x, 2, "random", user_raw=np.array([1000, 777]))
    assert "user 777 (raw id" in str(ei.value) and "2 interaction(s)" in str(ei.value)


# --------------------------------------------------------------------------------------------- ratio
def test_ratio_split_formula():
    n_per_user = [1, 2, 5, 10, 13]
    user = np.repeat(np.arange(5), n_per_user)
    x = Interactions(user=user, item=np.arange(len(user)))
    s = ratio_split(x, (0.8, 0.1, 0.1), "file")
    for u, n in enumerate(n_per_user):
        te = max(int(np.floor(0.8 * n)), 1)
        ve = max(int(np.floor(0.9 * n)), te)
        items = x.item[x.user == u]  # file order
        np.testing.assert_array_equal(s.train.item[s.train.user == u], items[:te])
        np.testing.assert_array_equal(s.valid.item[s.valid.user == u], items[te:ve])
        np.testing.assert_array_equal(s.test.item[s.test.user == u], items[ve:])


def test_ratio_split_citeulike_counts(citeulike):
    x, user_raw, item_raw = citeulike
    s = ratio_split(x, (0.8, 0.1, 0.1), "file", num_users=len(user_raw))
    assert (len(s.train), len(s.valid), len(s.test)) == (98_405, 12_451, 14_724)
    assert s.users_without("valid") == 701 and s.users_without("test") == 0


def test_ratio_random_and_time_orders_are_seeded():
    x = _random_inter(timestamps=True)
    a = ratio_split(x, (0.6, 0.2, 0.2), "random", seed=1)
    b = ratio_split(x, (0.6, 0.2, 0.2), "random", seed=1)
    np.testing.assert_array_equal(a.test.item, b.test.item)
    t = ratio_split(x, (0.6, 0.2, 0.2), "time")
    for u in range(40):  # every test row is at least as late as every train row of the user
        assert t.test.timestamp[t.test.user == u].min(initial=99) >= t.train.timestamp[t.train.user == u].max()


# --------------------------------------------------------------------------------------------- DE-RRD split
def test_derrd_split_counts_and_equal_to_our_preprocessing(shared_root: Path, citeulike):
    s = load_derrd_split(shared_root / "citeulike-t" / "derrd_loo_seed0")
    assert (s.num_users, s.num_items) == (5_220, 25_182)
    assert (len(s.train), len(s.valid), len(s.test)) == (115_142, 5_219, 5_219)
    np.testing.assert_array_equal(np.bincount(s.test.user, minlength=5_220)[:5_219], 1)
    x, _, _ = citeulike  # the published split partitions exactly our remapped users >= 5 table
    assert _pairs(s.train) | _pairs(s.valid) | _pairs(s.test) == _pairs(x)


def test_derrd_bad_files(tmp_path: Path, write):
    write("d/train.tsv", "0\t1\n1\t2\n")
    write("d/valid.tsv", "0\t2\n")
    write("d/test.tsv", "1\t5\n")
    write("d/counts.txt", "user_count\t2\nitem_count\tmany\n")
    with pytest.raises(DataFormatError, match=r"counts.txt:2: item_count 'many'"):
        load_derrd_split(tmp_path / "d")
    write("d/counts.txt", "user_count\t2\nitem_count\t4\n")
    with pytest.raises(DataFormatError, match=r"test.tsv: data row 1: id 5 >= item_count 4"):
        load_derrd_split(tmp_path / "d")
    write("d/test.tsv", "1\t2\n")
    with pytest.raises(SplitError, match=r"\(user 1, item 2\) appears more than once"):
        load_derrd_split(tmp_path / "d")


# --------------------------------------------------------------------------------------------- negatives
def _check_negatives(neg: np.ndarray, indptr: np.ndarray, indices: np.ndarray, I: int, n: int) -> None:
    U = len(indptr) - 1
    assert neg.shape == (U, n) and neg.dtype == np.int64
    assert neg.min() >= 0 and neg.max() < I
    assert (np.diff(neg, axis=1) > 0).all()  # sorted and distinct per row
    keys = np.repeat(np.arange(U), np.diff(indptr)) * I + indices
    assert not np.isin(np.repeat(np.arange(U), n) * I + neg.reshape(-1), keys).any()  # never interacted


def test_user_items_csr_sorted_unique():
    indptr, indices = user_items_csr(np.array([2, 0, 2, 2, 0]), np.array([5, 3, 1, 5, 3]), 4)
    np.testing.assert_array_equal(indptr, [0, 1, 1, 3, 3])
    np.testing.assert_array_equal(indices, [3, 1, 5])


def test_negatives_citeulike_never_interacted_and_seeded(citeulike):
    x, user_raw, item_raw = citeulike
    csr = user_items_csr(x.user, x.item, len(user_raw))
    neg = sample_eval_negatives(csr, len(item_raw), 499, seed=0)
    _check_negatives(neg, *csr, len(item_raw), 499)
    np.testing.assert_array_equal(neg[:50], sample_eval_negatives(csr, len(item_raw), 499, seed=0)[:50])
    assert (sample_eval_negatives(csr, len(item_raw), 499, seed=1) != neg).mean() > 0.9


@pytest.mark.parametrize("bitmap", [True, False])
def test_negatives_sparse_dense_and_empty_users(monkeypatch: pytest.MonkeyPatch, bitmap: bool):
    if not bitmap:
        monkeypatch.setattr(S, "_BITMAP_MAX_ITEMS", 0)  # the searchsorted membership path
    I, n = 300, 40
    rng = np.random.default_rng(0)
    deg = np.array([0, 5, 100, 160, 250, 260, 3, 0])  # sparse, dense (> I/2 or < 4n free) and empty users
    user = np.repeat(np.arange(len(deg)), deg)
    item = np.concatenate([rng.choice(I, d, replace=False) for d in deg])
    csr = user_items_csr(user, item, len(deg))
    neg = sample_eval_negatives(csr, I, n, seed=7)
    _check_negatives(neg, *csr, I, n)
    np.testing.assert_array_equal(neg, sample_eval_negatives(csr, I, n, seed=7))


def test_negatives_are_uniform_over_free_items():
    I, n, U = 60, 10, 4000
    user = np.repeat(np.arange(U), 3)
    item = np.tile([0, 1, 2], U)  # every user interacted with items 0..2
    neg = sample_eval_negatives(user_items_csr(user, item, U), I, n, seed=0)
    freq = np.bincount(neg.reshape(-1), minlength=I)
    assert (freq[:3] == 0).all()
    expected = U * n / (I - 3)  # ~702 per free item
    assert np.abs(freq[3:] - expected).max() < 6 * np.sqrt(expected)


def test_negatives_too_few_free_items_names_user():
    user, item = np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2])
    with pytest.raises(SplitError, match=r"user 42 \(raw id; remapped id 1\) has only 2 non-interacted items"):
        sample_eval_negatives(user_items_csr(user, item, 2), 5, 3, user_raw=np.array([41, 42]))
