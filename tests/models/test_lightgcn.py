"""LightGCN on a graph small enough to propagate by hand."""

import math

import numpy as np
import torch

from rayrec.models.lightgcn import LightGCN, normalized_adjacency


def test_normalized_adjacency_by_hand():
    # users 0,1; items 0,1,2; edges u0-i0, u0-i1, u1-i1 (+ a duplicate), item 2 isolated
    adj = normalized_adjacency(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2, 3).to_dense()
    d = {"u0": 2, "u1": 1, "i0": 1, "i1": 2}
    want = torch.zeros(5, 5)
    for (a, da), (b, db) in [((0, "u0"), (2, "i0")), ((0, "u0"), (3, "i1")), ((1, "u1"), (3, "i1"))]:
        want[a, b] = want[b, a] = 1 / math.sqrt(d[da] * d[db])
    torch.testing.assert_close(adj, want)
    assert adj[4].abs().sum() == 0  # isolated item: zero row


def test_propagation_is_the_layer_mean_and_gradients_flow():
    torch.manual_seed(0)
    users, items = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    m = LightGCN(3, 4, 5, layers=2, train_users=users, train_items=items)
    A = normalized_adjacency(users, items, 3, 4).to_dense()
    e0 = torch.cat([m.user_emb.weight, m.item_emb.weight]).detach()
    want = (e0 + A @ e0 + A @ A @ e0) / 3
    U, I = m.propagate()
    torch.testing.assert_close(torch.cat([U, I]), want)
    s = m.score(torch.tensor([0, 2]), torch.tensor([[0, 3], [2, 1]]))
    torch.testing.assert_close(s, torch.stack([want[[3, 6]] @ want[0], want[[5, 4]] @ want[2]]))
    torch.testing.assert_close(m.score_all(torch.tensor([1])), (want[1] @ want[3:].T).unsqueeze(0))
    m.base_loss(torch.tensor([0]), torch.tensor([0]), torch.tensor([[3]])).backward()
    # user 0's loss reaches, through two hops, user 1 (shares item 1) but not user 2 (its own component)
    g = m.user_emb.weight.grad
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and g[2].abs().sum() == 0
    assert m.num_parameters() == (3 + 4) * 5 and m.user_repr(torch.tensor([1]), layer=0)["emb"].shape == (1, 5)


def test_propagation_gradients_equal_the_dense_graph_and_one_propagation_serves_a_step():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 6, 20), rng.integers(0, 9, 20)
    m = LightGCN(6, 9, 4, layers=3, train_users=users, train_items=items)
    A = normalized_adjacency(users, items, 6, 9).to_dense()
    w = torch.cat([m.user_emb.weight, m.item_emb.weight]).detach().requires_grad_(True)
    e, acc = w, w
    for _ in range(3):
        e = A @ e
        acc = acc + e
    want = acc / 4
    target = torch.randn(15, 4)
    ((want - target) ** 2).sum().backward()
    with m.shared_forward():  # one training step: one propagation serves every lookup
        U, I = m.propagate()
        assert m.propagate()[0] is U and m.user_repr(torch.tensor([1]))["emb"].shape == (1, 4)
        ((torch.cat([U, I]) - target) ** 2).sum().backward()
        with torch.no_grad():
            assert m.propagate()[0] is not U  # another grad mode: propagated again (without a graph)
    torch.testing.assert_close(torch.cat([U, I]), want.detach())
    torch.testing.assert_close(torch.cat([m.user_emb.weight.grad, m.item_emb.weight.grad]), w.grad)
    assert m.propagate()[0] is not U  # outside a span every call propagates
    with torch.no_grad():
        m.user_emb.weight.add_(1.0)  # the weights change between spans
    with m.shared_forward():
        U2, _ = m.propagate()
    e = torch.cat([m.user_emb.weight, m.item_emb.weight]).detach()
    e_acc, cur = e, e
    for _ in range(3):
        cur = A @ cur
        e_acc = e_acc + cur
    torch.testing.assert_close(U2.detach(), (e_acc / 4)[:6])
