"""Row-sparse gradient sync (train.grad_sync=rows): the same gradients and Adam steps as DDP's dense all-reduce."""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rayrec.models.base import Table
from rayrec.train.grad_sync import RowSparseState, row_sparse_hook, table_parameters

USERS, ITEMS, WIDE, D = 300, 5000, 40, 8


class _Net(nn.Module):
    """Two row-sparse tables, one table every step touches whole (dense fallback) and a dense layer."""

    def __init__(self):
        super().__init__()
        self.users, self.items, self.wide = Table(USERS, D), Table(ITEMS, D), Table(WIDE, D)
        self.proj = nn.Linear(D, D)

    def forward(self, u, i):  # u, i [B]
        wide = self.wide.weight.sum(0)  # [D]: every row of `wide` gets a gradient
        return (self.proj(self.users(u)) * (self.items(i) + wide)).sum(1).square().sum()


# rows a rank a step: the first step's counts find no capacity (a second gather), the second fits the capacity
# (16 + 25%), the third outgrows it (a second gather)
SIZES = (16, 8, 48)
# (bucket_cap_mb: one bucket for all / one per parameter, NaN rank, steps of dense fallback before a table leaves
# the row-sparse path)
CASES = [(25.0, -1, 8), (0.01, -1, 2), (25.0, 1, 8)]


# gloo on CPU; nccl where 2 GPUs are visible (one per rank)
GPU = torch.cuda.device_count() >= 2


def _run(rank: int, cap: float, nan_rank: int, give_up: int) -> dict:
    dev = torch.device(f"cuda:{rank}" if GPU else "cpu")
    torch.manual_seed(0)
    ref, rows = _Net().to(dev), _Net().to(dev)
    rows.load_state_dict(ref.state_dict())
    ids = [rank] if GPU else None
    ref, rows = DDP(ref, bucket_cap_mb=cap, device_ids=ids), DDP(rows, bucket_cap_mb=cap, device_ids=ids)
    hook = RowSparseState(table_parameters(rows), give_up_after=give_up)
    rows.register_comm_hook(hook, row_sparse_hook)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, rows)]
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    grads, flags = [], []
    for step, b in enumerate(SIZES):
        u, i = torch.randint(0, USERS, (b,), generator=g).to(dev), torch.randint(0, ITEMS, (b,), generator=g).to(dev)
        for m, opt in zip((ref, rows), opts):
            opt.zero_grad()
            loss = m(u, i)
            if step == 2 and rank == nan_rank:
                loss = loss * float("nan")
            hook.flag, hook.flag_sum = float(not torch.isfinite(loss)), None  # rides on the first gather
            loss.backward()
            opt.step()
        flags.append(hook.flag_sum)
        grads.append({n: (a.grad.cpu(), b.grad.cpu()) for (n, a), (_, b) in
                      zip(ref.module.named_parameters(), rows.module.named_parameters())})
    return {"grads": grads, "stats": hook.stats, "flags": flags,
            "params": {n: (a.detach().cpu(), b.detach().cpu()) for (n, a), (_, b) in
                       zip(ref.module.named_parameters(), rows.module.named_parameters())}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if GPU:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if GPU else "gloo", rank=rank, world_size=world)
    torch.save([_run(rank, *case) for case in CASES], f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_row_sparse_sync_equals_dense_allreduce(tmp_path, spawn):
    out = str(tmp_path / "sync")
    spawn(_worker, lambda port: (2, port, out))
    for rank in (0, 1):
        cases = torch.load(f"{out}.{rank}")
        for (cap, nan_rank, give_up), res in zip(CASES, cases):
            steps = res["grads"] if nan_rank < 0 else res["grads"][:2]
            for step in steps:
                for n, (a, b) in step.items():
                    assert torch.equal(a, b), (cap, rank, n)  # exact: a/2 + b/2, summed in the same order
            if nan_rank < 0:
                for n, (a, b) in res["params"].items():
                    assert torch.equal(a, b), (cap, rank, n)
                # users and items (<= 48 of 300 / 5000 rows a rank) went sparse; `wide` (all 40 rows) went dense,
                # and after `give_up` such steps left the row-sparse path
                st = res["stats"]
                assert st["sparse"] == 2 * 3 and st["dense"] == min(3, give_up), st
                assert 0 < st["rows"] <= 2 * sum(SIZES) and st, st
                # steps 1 and 3 gathered again (once per bucket holding a table: DDP re-buckets after step 1)
                assert st["regathers"] == 2 if cap > 1 else 2 <= st["regathers"] <= 4, st
            else:  # rank 1's NaN loss reached every rank's gradients, as with the dense all-reduce
                for n, (a, b) in res["grads"][2].items():
                    assert torch.isfinite(a).all() == torch.isfinite(b).all(), (rank, n)
                assert not torch.isfinite(res["grads"][2]["items.weight"][1]).all()
            # the loss flags summed over ranks, as the training loop reads them instead of its own all-reduce
            assert res["flags"] == [0.0, 0.0, 1.0 if nan_rank >= 0 else 0.0], res["flags"]


def test_table_parameters_skips_frozen_and_sparse():
    net = _Net()
    net.wide.weight.requires_grad_(False)
    names = {id(p) for p in table_parameters(net)}
    assert names == {id(net.users.weight), id(net.items.weight)}
    assert table_parameters(nn.Embedding(3, 2, sparse=True)) == []
