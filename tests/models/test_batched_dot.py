"""batched_dot: einsum("bd,bcd->bc") with a faster backward, bit-equal values and gradients."""

import pytest
import torch

from rayrec.models.base import batched_dot


@pytest.mark.parametrize("shape", [(830, 80, 20), (512, 1, 20), (7, 3, 200)])
def test_equals_einsum_values_and_gradients(shape):
    B, C, D = shape
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, D, generator=g, requires_grad=True)
    v = torch.randn(B, C, D, generator=g, requires_grad=True)
    ref = torch.einsum("bd,bcd->bc", u, v)
    up = torch.randn(B, C, generator=g)
    want = torch.autograd.grad(ref, (u, v), up)
    got_s = batched_dot(u, v)
    got = torch.autograd.grad(got_s, (u, v), up)
    assert torch.equal(got_s, ref)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # one input without a gradient (a frozen side)
    (gv,) = torch.autograd.grad(batched_dot(u.detach(), v), (v,), up)
    assert torch.equal(gv, want[1])


def test_gradcheck_and_autocast_fallback():
    u = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    v = torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(batched_dot, (u, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # einsum's own autocast rule
        assert batched_dot(u.float(), v.float()).dtype == torch.bfloat16
