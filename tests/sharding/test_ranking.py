"""Distributed top-k over a row-sharded item table equals the dense computation (2 gloo ranks, uneven blocks)."""

import os

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


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    users, items, indptr, indices = _data()
    bounds = [0, 12, I]  # uneven row blocks, like TorchRec's row-wise shards
    lo, hi = bounds[rank], bounds[rank + 1]
    my_users = torch.arange(U)[rank::world]  # uneven query counts too (9 and 8)
    s, i = sharded_topk(users[my_users], my_users, items[lo:hi], lo, K, indptr, indices)
    my_items = torch.arange(lo, hi)  # item neighbours: queries are this rank's own rows
    ns, ni = sharded_topk(items[lo:hi], my_items, items[lo:hi], lo, K, exclude_self=True)
    es, ei = sharded_topk(users[:0], my_users[:0], items[lo:hi], lo, K)  # a rank with no queries still joins
    torch.save({"s": s, "i": i, "u": my_users, "ns": ns, "ni": ni, "q": my_items, "empty": ei.shape}, f"{out}.{rank}")
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


def test_sharded_topk_equals_dense(tmp_path, spawn):
    out = str(tmp_path / "r")
    spawn(_worker, lambda port: (2, port, out))
    users, items, indptr, indices = _data()
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        ws, wi = _brute(users[got["u"]], got["u"], items, K, indptr, indices)
        torch.testing.assert_close(got["s"], ws)
        assert torch.equal(got["i"], wi)
        ns, ni = _brute(items[got["q"]], got["q"], items, K, exclude_self=True)
        torch.testing.assert_close(got["ns"], ns)
        assert torch.equal(got["ni"], ni)
        assert got["empty"] == (0, K)
