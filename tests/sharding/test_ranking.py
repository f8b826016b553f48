"""Distributed top-k over a row-sharded item table equals the dense computation (2 gloo ranks, uneven blocks)."""

import os

import pytest
import torch
import torch.distributed as dist

from rayrec.sharding.ranking import sharded_topk

U, I, D, K = 17, 23, 5, 6



def _data():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(U, D, generator=g), torch.randn(I, D, generator=g)
    indptr = torch.zeros(U + 1, dtype=torch.int64)
    cols = []
    for u in range(U):
        c = torch.randperm(I, generator=g)[: int(torch.randint(0, 8, (1,), generator=g))].sort().values
        cols.append(c)
        indptr[u + 1] = indptr[u] + len(c)
    return users, items, indptr, torch.cat(cols)


def _brute(queries, qids, keys, k, indptr=None, indices=None, exclude_self=False):
    s = queries @ keys.T
    for r, q in enumerate(qids.tolist()):
        if indptr is not None:
            s[r, indices[indptr[q] : indptr[q + 1]]] = -torch.inf
        if exclude_self:
            s[r, q] = -torch.inf
    return torch.topk(s, k, dim=1)


def _worker(rank, world, port, out, native="1"):
    from rayrec import kernels

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RAYREC_NATIVE=native)
    kernels._state.clear()  # native "0": the matmul + block top-k path, "1": the fused kernel where it builds
    dist.init_process_group("gloo", rank=rank, world_size=world)
    users, items, indptr, indices = _data()
    bounds = [0, 12, I]  # uneven row blocks, like TorchRec's row-wise shards
    lo, hi = bounds[rank], bounds[rank + 1]
    my_users = torch.arange(U)[rank::world]  # uneven query counts too (9 and 8)
    s, i = sharded_topk(users[my_users], my_users, items[lo:hi], lo, K, indptr, indices)
    my_items = torch.arange(lo, hi)  # item neighbours: queries are this rank's own rows
    ns, ni = sharded_topk(items[lo:hi], my_items, items[lo:hi], lo, K, exclude_self=True)
    es, ei = sharded_topk(users[:0], my_users[:0], items[lo:hi], lo, K)  # a rank with no queries still joins
    torch.save({"s": s, "i": i, "u": my_users, "ns": ns, "ni": ni, "q": my_items, "empty": ei.shape,
                "native": kernels.native() is not None}, f"{out}.{rank}")
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


@pytest.mark.parametrize("native", ["1", "0"])
def test_sharded_topk_equals_dense(tmp_path, spawn, native):
    import shutil

    out = str(tmp_path / "r")
    spawn(_worker, lambda port: (2, port, out, native))
    users, items, indptr, indices = _data()
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        # the fused kernel ran where a compiler is (exclusions and self as its CSR), the fallback otherwise
        assert got["native"] is (native == "1" and bool(shutil.which("c++") or shutil.which("g++")))
        ws, wi = _brute(users[got["u"]], got["u"], items, K, indptr, indices)
        torch.testing.assert_close(got["s"], ws)
        assert torch.equal(got["i"], wi)
        ns, ni = _brute(items[got["q"]], got["q"], items, K, exclude_self=True)
        torch.testing.assert_close(got["ns"], ns)
        assert torch.equal(got["ni"], ni)
        assert got["empty"] == (0, K)


def test_block_topk_equals_topk_with_ties_inf_and_leftover_columns():
    from rayrec.topk import block_topk, sorted_topk

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 300, (9, 1003), generator=g).float()  # many ties; 1003 = 4 * 250 + 3 leftover columns
    s[0, :] = -torch.inf  # no admissible item
    s[1, 500:] = -torch.inf  # fewer finite scores than k in the first block only
    s[2, -3:] = 1000.0  # the leftover columns hold the best items
    s[3, torch.randperm(1003, generator=g)[:990]] = -torch.inf  # only 13 finite scores
    # 0: the default g; 600: one plain topk; (3, 112): a GPU's large groups (groups_for), here on the CPU
    for k, g in ((1, 0), (50, 0), (120, 0), (50, 4), (30, 7), (600, 0), (3, 112)):
        v, i = block_topk(s, k, g)
        want = torch.topk(s, k, dim=1).values
        assert torch.equal(v.sort(dim=1, descending=True).values, want)
        assert torch.equal(s.gather(1, i), v)  # ids point at their values
        assert all(len(set(r.tolist())) == k for r in i)  # distinct items
    v, i = sorted_topk(s, 50)
    assert torch.equal(v, torch.topk(s, 50, dim=1).values) and torch.equal(s.gather(1, i), v)
    assert torch.isin(torch.tensor([1000, 1001, 1002]), block_topk(s, 3)[1][2]).all()


def test_group_sizes_per_device():
    from rayrec.topk import groups_for

    # CPU: about n / (8 k) in [2, 16]; CUDA: about sqrt(n / k) / 2 in [2, 128] (the sweeps' best)
    assert [groups_for(25_182, k) for k in (20, 100, 500)] == [16, 16, 6]
    assert [groups_for(n, k, "cuda") for n, k in ((25_182, 20), (1_000_000, 20), (25_182, 500), (100, 50),
                                                   (10**9, 1))] == [18, 112, 4, 2, 128]


def test_dot_scores_in_item_blocks_equal_one_matmul():
    from rayrec.topk import dot_scores

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(16, 64, generator=g), torch.randn(1003, 64, generator=g)  # 1003 = 3 blocks of 300 + 103
    want = q @ keys.T
    for kt in (keys.T, keys.T.contiguous()):  # a transposed view or a [D, I] table
        got = dot_scores(q, kt, block=300)
        assert got.shape == (16, 1003) and torch.allclose(got, want, atol=1e-5)
        assert torch.equal(got[:, 300:600], q @ kt[:, 300:600])  # each block is its own GEMM, bit for bit
    for small in (q[:1], q[:, :20]):  # one user, a narrow student: one matmul
        kt = keys[:, : small.shape[1]].T
        assert torch.equal(dot_scores(small, kt, block=300), small @ kt)
    q.requires_grad_(True)  # gradients wanted: one matmul, differentiable
    dot_scores(q, keys.T, block=300).sum().backward()
    assert torch.allclose(q.grad, keys.sum(0).expand(16, -1), atol=1e-4)


def test_one_process_ranking_follows_in_place_changes_of_the_table():
    # the fused path keeps the table's transposed copy between calls: an in-place change, or a new table at the
    # same address, must not serve stale scores
    users, items, indptr, indices = _data()
    ids = torch.arange(U)
    s1, i1 = sharded_topk(users, ids, items, 0, K, indptr, indices)
    ws, wi = _brute(users, ids, items, K, indptr, indices)
    assert torch.equal(i1, wi)
    items.mul_(-1)
    s2, i2 = sharded_topk(users, ids, items, 0, K, indptr, indices)
    ws, wi = _brute(users, ids, items, K, indptr, indices)
    torch.testing.assert_close(s2, ws)
    assert torch.equal(i2, wi)
    del items
    other = torch.randn(I, D, generator=torch.Generator().manual_seed(5))
    s3, i3 = sharded_topk(users, ids, other, 0, K, indptr, indices)
    assert torch.equal(i3, _brute(users, ids, other, K, indptr, indices)[1])
