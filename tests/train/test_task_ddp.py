"""Loss scale under DDP: with reduction="sum" the applied gradient is that of the global batch sum."""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from rayrec.models import BPR
from rayrec.train.task import TrainTask



def _batch():
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, 6, (8,), generator=g)
    pos = torch.randint(0, 9, (8,), generator=g)
    neg = torch.randint(0, 9, (8, 2), generator=g)
    return users, pos, neg


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    task = DDP(TrainTask(BPR(6, 9, 4), reduction="sum", world_size=world))
    users, pos, neg = _batch()
    sl = slice(rank * 4, rank * 4 + 4)  # each rank gets half of the global batch
    loss, _ = task(users[sl], pos[sl], neg[sl])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in task.module.named_parameters()}, out)
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


def test_sum_reduction_gradient_equals_global_batch_sum(tmp_path, spawn):
    out = str(tmp_path / "grads.pt")
    spawn(_worker, lambda port: (2, port, out))
    ddp_grads = torch.load(out)
    torch.manual_seed(0)
    ref = TrainTask(BPR(6, 9, 4), reduction="sum", world_size=1)
    loss, _ = ref(*_batch())
    loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-5, atol=1e-7)
