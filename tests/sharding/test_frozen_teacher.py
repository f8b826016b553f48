"""A frozen sharded teacher: loaded from DCP shards, gives representations/scores, and stays bit-identical
through a distillation step that backpropagates through a student using its outputs."""

import os

import torch
import torch.distributed as dist

from rayrec.models import BPR
from rayrec.sharding import dense_state_dict, shard_model
from rayrec.sharding.checkpoint import save_sharded
from rayrec.teacher import load_frozen_teacher
from rayrec.train.task import TrainTask

U, I, D = 9, 17, 8



def _worker(rank, world, port, ckpt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rayrec.models.sharded import ShardedBPR

    torch.manual_seed(0)
    trained = shard_model(TrainTask(ShardedBPR(U, I, D, init_std=0.5)), optimizer="exact_sgd", lr=0.1)
    save_sharded(trained, ckpt)  # stands for a trained teacher's checkpoint
    teacher = load_frozen_teacher(ckpt, name="bpr", num_users=U, num_items=I, dim=D)
    before = dense_state_dict(teacher.dmp)

    student = BPR(U, I, 2)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(rank)
    users, items = torch.randint(0, U, (4,), generator=g), torch.randint(0, I, (4, 3), generator=g)
    teacher.train()  # must not leave eval mode
    out_t = teacher.lookup(users, items)
    # a distillation step: match the teacher's scores (and a loss that would move the teacher if it could)
    loss = ((student.score(users, items) - out_t.scores) ** 2).sum() + out_t.user["emb"].sum()
    loss.backward()
    opt.step()
    after = dense_state_dict(teacher.dmp)
    trained_full = dense_state_dict(trained)  # collective: every rank calls it
    # every user's list scored once (SLD's per-epoch lists), users split over the ranks, small chunks so the
    # ranks run different numbers of real chunks (lockstep padding)
    lists = torch.stack([torch.randperm(I, generator=torch.Generator().manual_seed(u))[:5] for u in range(U)])
    list_scores = teacher.score_lists(lists, chunk_pairs=10)
    # the same checkpoint held dense in every worker (no TorchRec lookups) answers the same
    dense = load_frozen_teacher(ckpt, name="bpr", num_users=U, num_items=I, dim=D, sharding_type="dense")
    dense.train()
    out_d = dense.lookup(users, items)
    dense_same = (torch.equal(out_d.scores, out_t.scores) and torch.equal(out_d.user["emb"], out_t.user["emb"])
                  and torch.equal(out_d.item["emb"], out_t.item["emb"]) and not dense.dmp.training
                  and not any(p.requires_grad for p in dense.parameters()))
    dense_lists = dense.score_lists(lists, chunk_pairs=10)
    if rank == 0:
        torch.save({"dense_same": dense_same, "dense_lists": dense_lists, "lists": lists, "list_scores": list_scores, "before": before, "after": after, "training": teacher.dmp.training,
                    "requires_grad": out_t.scores.requires_grad, "user": out_t.user["emb"].shape,
                    "item": out_t.item["emb"].shape, "trained": trained_full}, out)
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


def test_frozen_teacher_is_bit_identical_after_a_distillation_step(tmp_path, spawn):
    out = tmp_path / "o.pt"
    spawn(_worker, lambda port: (2, port, str(tmp_path / "teacher"), str(out)))
    r = torch.load(out)
    assert r["training"] is False and r["requires_grad"] is False
    assert r["user"] == (4, D) and r["item"] == (4, 3, D)
    for k, v in r["before"].items():
        assert torch.equal(v, r["after"][k]), k  # bit-identical
        assert torch.equal(v, r["trained"][k]), k  # and equal to the checkpoint it was loaded from
    user, item = r["trained"]["model.ec.embeddings.user.weight"], r["trained"]["model.ec.embeddings.item.weight"]
    want = torch.einsum("ud,ucd->uc", user, item[r["lists"]])  # [U, 5]
    torch.testing.assert_close(r["list_scores"], want, rtol=1e-5, atol=1e-6)
    assert r["dense_same"]
    torch.testing.assert_close(r["dense_lists"], want, rtol=1e-5, atol=1e-6)
