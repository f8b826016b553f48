"""models.base.Table: nn.Embedding's rows and gradients, with a faster CPU backward (index_put_ accumulate)."""

import pytest
import torch

from rayrec.models.base import Table, _Rows


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the path Table takes on one thread (train.threads_per_worker=1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("n, shape", [(66_400, (830, 80)), (1024, (1024,)), (7, (7,))])
def test_rows_and_gradient_bit_equal_to_index_add(n, shape, one_thread):
    g = torch.Generator().manual_seed(0)
    t = Table(500, 20)
    ids = torch.randint(0, 500, shape, generator=g)  # many repeated ids
    up = torch.randn(*shape, 20, generator=g)
    out = t(ids)
    assert torch.equal(out, torch.nn.functional.embedding(ids, t.weight))
    (got,) = torch.autograd.grad(out, t.weight, up)
    want = torch.zeros(500, 20).index_add_(0, ids.reshape(-1), up.reshape(-1, 20))  # the sums in id order
    assert torch.equal(got, want)
    emb = torch.autograd.grad(torch.nn.functional.embedding(ids, t.weight), t.weight, up)[0]
    torch.testing.assert_close(got, emb)  # embedding_dense_backward's own order: equal up to rounding


def test_no_grad_and_frozen_tables_take_the_plain_lookup(one_thread):
    t = Table(10, 4)
    ids = torch.tensor([[1, 2], [2, 9]])
    with torch.no_grad():
        assert torch.equal(t(ids), t.weight[ids])
    t.weight.requires_grad_(False)
    assert t(ids).grad_fn is None and t(ids).shape == (2, 2, 4)


def test_more_threads_keep_index_add():
    # index_put_'s parallel accumulation is not deterministic: with 2+ threads the lookup's backward is index_select's
    t = Table(10, 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert type(t(torch.tensor([1, 2])).grad_fn).__name__ == "ViewBackward0"
        assert "IndexSelect" in type(t(torch.tensor([1, 2])).grad_fn.next_functions[0][0]).__name__
        torch.set_num_threads(1)
        assert "Rows" in type(t(torch.tensor([1, 2])).grad_fn.next_functions[0][0]).__name__
    finally:
        torch.set_num_threads(old)


def test_gradcheck():
    w = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    ids = torch.tensor([0, 5, 5, 2])
    assert torch.autograd.gradcheck(lambda x: _Rows.apply(x, ids), (w,))
