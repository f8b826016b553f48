"""The fused RRD kernel (rayrec/csrc/list_rank.cpp behind rayrec.kernels.rrd_nll) against autograd of the float64
relaxed likelihood: values, both tables' gradients, the exact path for far-apart scores, repeated ids, partial
gradients, determinism, and RRD's use of it for BPR and LightGCN students."""

import numpy as np
import pytest
import torch

from rayrec import kernels
from rayrec.distill.base import DistillBatch
from rayrec.distill.losses import relaxed_ranking_nll
from rayrec.distill.rrd import RRD, RRDConfig
from rayrec.models import BPR, LightGCN


def _reference(U, V, users, items, K):
    """float64 autograd of the likelihood over gathered dot products -> (nll [B], gU, gV, w)."""
    U64, V64 = U.detach().double().requires_grad_(), V.detach().double().requires_grad_()
    s = (U64[users].unsqueeze(1) * V64[items]).sum(-1)  # [B, C]
    nll = relaxed_ranking_nll(s[:, :K], s[:, K:] if items.shape[1] > K else None)
    w = torch.linspace(0.5, 2.0, len(users), dtype=torch.float64)  # a different upstream gradient per row
    (nll * w).sum().backward()
    return nll.detach(), U64.grad, V64.grad, w


@pytest.mark.parametrize("B,C,K,D", [(37, 80, 40, 20), (5, 7, 7, 3), (64, 12, 5, 16), (9, 30, 10, 33),
                                     (3, 4, 1, 1), (130, 50, 25, 64)])
def test_fused_nll_and_gradients_match_float64_autograd(B, C, K, D, native_kernels):
    g = torch.Generator().manual_seed(B * 31 + C * 7 + D)
    U, V = torch.randn(50, D, generator=g) * 0.7, torch.randn(300, D, generator=g) * 0.7
    users = torch.randint(0, 50, (B,), generator=g)  # repeats: both tables accumulate over rows
    items = torch.randint(0, 300, (B, C), generator=g)
    items[0, 1] = items[0, 0]  # an item twice in one list
    want, gU64, gV64, w = _reference(U, V, users, items, K)
    U32, V32 = U.clone().requires_grad_(), V.clone().requires_grad_()
    got = kernels.rrd_nll(U32, V32, users, items, K)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "_RRDNLLBackward"  # the kernel ran
    (got * w.float()).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(U32.grad.double(), gU64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(V32.grad.double(), gV64, rtol=1e-4, atol=1e-5)


def test_far_apart_scores_take_the_exact_path(native_kernels):
    # rows whose scores lie > 80 apart (float's e^{a - m} would underflow) and huge ones: finite, and as float64
    D = 2
    U = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.01, 0.0]])
    V = torch.tensor([[200.0, 0], [-100.0, 0], [50.0, 0], [0.0, 0], [1e4, 0], [-1e4, 0]])
    users = torch.tensor([0, 1, 2])
    items = torch.tensor([[0, 1, 2, 3], [4, 5, 3, 0], [1, 0, 2, 3]])  # row 2: scores of order 1, the fast path
    want, gU64, gV64, w = _reference(U, V, users, items, 2)
    U32, V32 = U.clone().requires_grad_(), V.clone().requires_grad_()
    got = kernels.rrd_nll(U32, V32, users, items, 2)
    (got * w.float()).sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(U32.grad).all() and torch.isfinite(V32.grad).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(U32.grad.double(), gU64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(V32.grad.double(), gV64, rtol=1e-4, atol=1e-4)
    assert D == U.shape[1]


def test_backward_is_deterministic_partial_and_checks_ids(native_kernels):
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(40, 20, generator=g), torch.randn(500, 20, generator=g)
    users, items = torch.randint(0, 40, (200,), generator=g), torch.randint(0, 500, (200, 80), generator=g)
    w = torch.randn(200, 80, generator=g)
    a = native_kernels.list_dot_backward(w, U, V, users, items, True, True)
    torch.set_num_threads(2)
    try:
        b = native_kernels.list_dot_backward(w, U, V, users, items, True, True)
        f2 = native_kernels.rrd_forward(U, V, users, items, 40)
    finally:
        torch.set_num_threads(1)
    f1 = native_kernels.rrd_forward(U, V, users, items, 40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # bit-equal run to run
    assert torch.equal(f1[0], f2[0]) and torch.equal(f1[1], f2[1])  # rows do not depend on the thread count
    gu_only, gv_only = (native_kernels.list_dot_backward(w, U, V, users, items, True, False),
                        native_kernels.list_dot_backward(w, U, V, users, items, False, True))
    assert torch.equal(gu_only[0], a[0]) and gu_only[1].numel() == 0
    assert torch.equal(gv_only[1], a[1]) and gv_only[0].numel() == 0
    with pytest.raises(RuntimeError, match="item id out of range"):
        native_kernels.rrd_forward(U, V, users, items.masked_fill(items == items[5, 5], 500), 40)
    with pytest.raises(RuntimeError, match="user id out of range"):
        native_kernels.list_dot_backward(w, U, V, users - 1, items, True, True)
    with pytest.raises(RuntimeError, match="K <= C"):
        native_kernels.rrd_forward(U, V, users, items, 81)


def test_the_op_falls_back_to_autograd_without_the_kernel(monkeypatch, native_kernels):
    g = torch.Generator().manual_seed(4)
    U, V = torch.randn(30, 8, generator=g), torch.randn(90, 8, generator=g)
    users, items = torch.arange(30), torch.randint(0, 90, (30, 12), generator=g)
    fused = kernels.rrd_nll(U, V, users, items, 6)
    monkeypatch.setattr(kernels, "native", lambda: None)
    plain = kernels.rrd_nll(U, V, users, items, 6)
    assert plain.grad_fn is None or "RRDNLL" not in type(plain.grad_fn).__name__
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _lightgcn(U, I, D):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, U, 200), rng.integers(0, I, 200)
    return LightGCN(U, I, D, init_std=0.3, layers=2, train_users=users, train_items=items)


@pytest.mark.parametrize("model", ["bpr", "lightgcn"])
def test_rrd_losses_use_the_kernel_and_give_the_autograd_gradients(model, monkeypatch, native_kernels):
    U, I, D = 12, 60, 6
    torch.manual_seed(0)
    student = BPR(U, I, D, init_std=0.3) if model == "bpr" else _lightgcn(U, I, D)
    topn = np.stack([np.random.default_rng(u).permutation(np.arange(6, I))[:15] for u in range(U)])
    indptr, indices = np.arange(0, 2 * U + 1, 2), np.array([0, 1, 2, 3, 4, 5] * (U // 3))
    rrd = RRD(RRDConfig(K=5, L=7, lambda_rrd=0.3), topn=topn, train_indptr=indptr, train_indices=indices, num_items=I)
    rrd.on_epoch_start(0, torch.Generator().manual_seed(0))
    batch = DistillBatch(torch.tensor([0, 3, 3, 7, 11]), torch.tensor([0, 1, 2, 3, 4]), torch.tensor([[5], [6], [7],
                                                                                                     [8], [9]]))
    calls = []
    real = kernels.rrd_nll
    monkeypatch.setattr("rayrec.distill.rrd.rrd_nll", lambda *a: calls.append(1) or real(*a))

    def run():
        student.zero_grad()
        loss = rrd.losses(batch=batch, student=student, teacher=None)["kd/rrd"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    fused_loss, fused_grads = run()
    assert calls == [1]
    monkeypatch.setattr("rayrec.distill.rrd.uses_native_lists", lambda *a: False)
    plain_loss, plain_grads = run()
    assert calls == [1]  # the plain path: student.score + relaxed_ranking_nll
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.abs().sum() > 0
