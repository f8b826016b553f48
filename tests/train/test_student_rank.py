"""The current student's top-K for SLD/CPD: the fused kernel path returns what the matmul path does."""

import numpy as np
import pytest
import torch

from rayrec import kernels
from rayrec.eval.evaluate import CSR
from rayrec.models import BPR, LightGCN
from rayrec.train import student_rank
from rayrec.train.student_rank import student_topk

U, I, D, K = 30, 500, 8, 25


def _exclusions(full_user: int | None = None):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(U), 12)
    items = rng.integers(0, I, len(users))
    if full_user is not None:  # this user has only K - 5 admissible items left
        users = np.concatenate([users, np.full(I - K + 5, full_user)])
        items = np.concatenate([items, np.arange(K - 5, I)])
    return users, items, CSR.from_pairs(users, items, U)


@pytest.mark.parametrize("kind", ["bpr", "lightgcn"])
@pytest.mark.parametrize("full_user", [None, 7])
def test_fused_student_topk_equals_the_matmul_path(kind, full_user, monkeypatch):
    if kernels.native() is None:
        pytest.skip(f"no fused kernel here: {kernels.native_error()}")
    torch.manual_seed(0)
    users, items, exclude = _exclusions(full_user)
    model = (BPR(U, I, D, init_std=0.5) if kind == "bpr"
             else LightGCN(U, I, D, layers=2, train_users=users, train_items=items))
    calls = []
    real = student_rank._fused_topk
    monkeypatch.setattr(student_rank, "_fused_topk", lambda *a: calls.append(1) or real(*a))
    fused = student_topk(model, U, K, exclude, chunk=8)
    assert len(calls) == 4  # 30 users in chunks of 8: the kernel was asked every time
    monkeypatch.setattr(kernels, "uses_native", lambda *a: False)
    plain = student_topk(model, U, K, exclude, chunk=8)
    assert fused.shape == (U, K) and torch.equal(fused, plain)
    if full_user is not None:  # that user's chunk went back to the matmul path: its list ends in excluded items
        assert set(fused[full_user, : K - 5].tolist()) == set(range(K - 5))
    train = set(zip(users.tolist(), items.tolist()))
    rows = [u for u in range(U) if u != full_user]
    assert not any((u, int(i)) in train for u in rows for i in fused[u])
