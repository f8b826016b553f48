import math

import numpy as np
import pytest
import torch

from rayrec.train.sampling import NegativeSampler, epoch_generator


def _csr(rows, num_users):
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    for u, items in rows.items():
        indptr[u + 1] = len(items)
    indptr = np.cumsum(indptr)
    indices = np.concatenate([np.sort(rows.get(u, [])) for u in range(num_users)]).astype(np.int64)
    return indptr, indices


def test_negatives_never_hit_train_items_and_are_uniform():
    rows = {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [9], 2: []}
    indptr, indices = _csr(rows, 3)
    s = NegativeSampler(indptr, indices, num_items=10)
    users = torch.tensor([0, 1, 2]).repeat(2000)
    neg = s.sample(users, 3, epoch_generator(0, 0, 0))
    assert neg.shape == (6000, 3)
    assert not s.contains(users, neg).any()
    assert set(neg[users == 0].flatten().tolist()) == {8, 9}
    counts = torch.bincount(neg[users == 2].flatten(), minlength=10).float()
    assert counts.min() > 0.8 * counts.mean()  # uniform over all 10 items for an empty user


def test_seeded_per_epoch_and_rank():
    indptr, indices = _csr({0: [1], 1: [2]}, 2)
    s = NegativeSampler(indptr, indices, num_items=50)
    u = torch.tensor([0, 1] * 50)
    a = s.sample(u, 2, epoch_generator(0, 1, 0))
    assert torch.equal(a, s.sample(u, 2, epoch_generator(0, 1, 0)))
    assert not torch.equal(a, s.sample(u, 2, epoch_generator(0, 2, 0)))
    assert not torch.equal(a, s.sample(u, 2, epoch_generator(0, 1, 1)))


def test_user_with_every_item_is_refused():
    indptr, indices = _csr({0: [0, 1, 2]}, 1)
    with pytest.raises(ValueError, match="user 0"):
        NegativeSampler(indptr, indices, num_items=3)


def _resample_all(s, users, n, gen):
    """The sampler's first form: every round tests the whole [B, n] block again."""
    neg = torch.randint(0, s.num_items, (users.shape[0], n), generator=gen)
    while True:
        bad = s.contains(users, neg)
        if not bad.any():
            return neg
        neg[bad] = torch.randint(0, s.num_items, (int(bad.sum()),), generator=gen)


@pytest.mark.parametrize("n", [1, 5])
def test_retesting_only_redrawn_positions_gives_the_same_draws(n):
    # dense users (most draws rejected, many rounds) and empty ones
    rng = np.random.default_rng(n)
    rows = {u: rng.choice(30, int(rng.integers(0, 29)), replace=False) for u in range(40)}
    indptr, indices = _csr(rows, 40)
    s = NegativeSampler(indptr, indices, num_items=30)
    users = torch.as_tensor(rng.integers(0, 40, 200))
    for seed in range(5):
        got = s.sample(users, n, torch.Generator().manual_seed(seed))
        assert torch.equal(got, _resample_all(s, users, n, torch.Generator().manual_seed(seed)))
        assert not s.contains(users, got).any()


def test_native_row_search_and_the_key_search_agree(monkeypatch, native_kernels):
    rng = np.random.default_rng(0)
    U, I = 300, 1000
    degree = rng.integers(0, 60, U)
    degree[[0, 7, U - 1]] = 0  # empty rows, first and last included
    indptr = np.concatenate([[0], np.cumsum(degree)])
    indices = np.concatenate([rng.permutation(I)[:d] for d in degree]).astype(np.int64)  # rows unsorted
    native = NegativeSampler(indptr, indices, num_items=I)
    users = torch.as_tensor(rng.integers(0, U, 4000))
    items = torch.as_tensor(rng.integers(0, I, (4000, 3)))
    hit = rng.integers(0, len(indices), 500)  # train pairs: many true hits
    users[:500], items[:500, 0] = torch.as_tensor(np.repeat(np.arange(U), degree)[hit]), torch.as_tensor(indices[hit])
    items[:, 2] = torch.as_tensor([I - 1] * 2000 + [0] * 2000)  # the id range's ends
    monkeypatch.setattr("rayrec.kernels.native", lambda: None)
    keys = NegativeSampler(indptr, indices, num_items=I)
    assert native._native is not None and keys._native is None
    want = keys.contains(users, items)
    assert want[:500, 0].all() and want.sum() > 500 and torch.equal(native.contains(users, items), want)
    for s in (native, keys):  # (their draws differ: see the next test for the native law)
        got = s.sample_distinct(users, 4, epoch_generator(0, 3, 1))
        assert (got.sort(dim=1).values.diff(dim=1) > 0).all() and not s.contains(users, got).any()


@pytest.mark.parametrize("candidates", [None, 3])  # 3: rows often run short, and the rounds redraw them
def test_native_distinct_sampling_is_uniform_without_replacement(monkeypatch, native_kernels, candidates):
    # user 0: 3 of 10 items excluded (35 allowed 3-sets); user 1: 6 excluded (4 allowed 3-sets); user 2: none
    indptr, indices = np.array([0, 3, 9, 9]), np.array([1, 4, 7, 0, 1, 2, 3, 5, 6])
    s = NegativeSampler(indptr, indices, num_items=10)
    assert s._native is not None
    if candidates is not None:
        monkeypatch.setattr(s, "_candidates", lambda n: candidates)
    users = torch.tensor([0, 1, 2]).repeat(30_000)
    got = s.sample_distinct(users, 3, torch.Generator().manual_seed(0))
    for u, allowed in ((0, [0, 2, 3, 5, 6, 8, 9]), (1, [4, 7, 8, 9]), (2, list(range(10)))):
        rows = got[users == u].sort(dim=1).values
        assert (rows.diff(dim=1) > 0).all() and torch.isin(rows, torch.tensor(allowed)).all()
        code = (rows * torch.tensor([100, 10, 1])).sum(1)  # each 3-set
        _, counts = torch.unique(code, return_counts=True)
        n_sets = math.comb(len(allowed), 3)
        assert len(counts) == n_sets  # every allowed 3-set occurs, with the same frequency
        torch.testing.assert_close(counts.double() / len(rows), torch.full((n_sets,), 1 / n_sets, dtype=torch.float64),
                                   rtol=0, atol=0.15 / n_sets + 2e-3)
    # the order inside a row is the draw order, not sorted: the first column is uniform over the allowed items too
    first = torch.bincount(got[users == 0][:, 0], minlength=10).double() / 30_000
    assert first[[1, 4, 7]].sum() == 0 and (first[[0, 2, 3, 5, 6, 8, 9]] - 1 / 7).abs().max() < 0.015
