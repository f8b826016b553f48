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
