"""Sharded DCP checkpoints round-trip across world sizes and sharding types (2 -> 1, 2 -> 2 other plan, 1 -> 2)."""

import os

import pytest
import torch
import torch.distributed as dist

from rayrec.models.sharded import ShardedBPR
from rayrec.sharding import dense_state_dict, shard_model
from rayrec.sharding.checkpoint import load_optimizer_shards, load_sharded, save_sharded, write_optimizer_shards
from rayrec.sharding.plan import _local_shards
from rayrec.train.task import TrainTask

U, I, D = 11, 23, 4



def _sharded_bpr(rank, world, port, mode, sharding_type, optimizer, lr):
    """Join the gloo group and shard a BPR whose init differs between saving and loading (a load must overwrite
    everything)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1234 if mode == "save" else 99)
    return shard_model(TrainTask(ShardedBPR(U, I, D, init_std=0.3)), sharding_type=sharding_type,
                       optimizer=optimizer, lr=lr)


def _worker(rank, world, port, mode, sharding_type, ckpt, out):
    dmp = _sharded_bpr(rank, world, port, mode, sharding_type, "exact_rowwise_adagrad", 0.1)
    if mode == "save":  # a training step fills the row-wise Adagrad accumulators of the rows it touched
        g = torch.Generator().manual_seed(rank)
        loss, _ = dmp(torch.randint(0, U, (6,), generator=g), torch.randint(0, I, (6,), generator=g),
                      torch.randint(0, I, (6, 2), generator=g))
        loss.backward()
        save_sharded(dmp, ckpt, extra={"epoch": 7, "world": world})
        assert write_optimizer_shards(dmp, f"{ckpt}_optim")
        files = sorted(p.name for p in __import__("pathlib").Path(ckpt).iterdir())
        extra = None
    else:
        extra = load_sharded(dmp, ckpt)
        load_optimizer_shards(dmp, f"{ckpt}_optim")
        files = None
    full = dense_state_dict(dmp)
    # optimizer state: this rank's pieces (with table-wise sharding a rank only has state for its own tables)
    pieces = [(f"{k}/{n}", tuple(t.shape), _local_shards(t)) for k, v in dmp.fused_optimizer.state_dict()["state"].items()
              for n, t in v.items()]
    torch.save(pieces, f"{out}.optim.{rank}")
    if rank == 0:
        torch.save({"full": full, "files": files, "extra": extra}, out)
    dist.destroy_process_group()


def _run(spawn, world, mode, sharding_type, ckpt, out):
    spawn(_worker, lambda port: (world, port, mode, sharding_type, str(ckpt), str(out)), world)
    r = torch.load(out)
    r["optim"] = {}
    for rank in range(world):  # assemble the full optimizer state from every rank's pieces
        for name, shape, shards in torch.load(f"{out}.optim.{rank}"):
            full = r["optim"].setdefault(name, torch.zeros(shape))
            for offsets, t in shards:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return r


@pytest.mark.parametrize("save_world, load_world, load_type", [(2, 1, "row_wise"), (2, 2, "table_wise"), (1, 2, "row_wise")])
def test_round_trip_across_world_sizes(tmp_path, spawn, save_world, load_world, load_type):
    ckpt = tmp_path / "ckpt"
    saved = _run(spawn, save_world, "save", "row_wise", ckpt, tmp_path / "saved.pt")
    assert ".metadata" in saved["files"] and "extra.json" in saved["files"]
    assert sum(f.endswith(".distcp") for f in saved["files"]) == save_world  # each rank wrote its own shards
    assert not (tmp_path / ".ckpt.tmp").exists()
    loaded = _run(spawn, load_world, "load", load_type, ckpt, tmp_path / "loaded.pt")
    assert loaded["extra"] == {"epoch": 7, "world": save_world}
    for k, v in saved["full"].items():
        torch.testing.assert_close(loaded["full"][k], v, rtol=0, atol=0)
    # the fused optimizer's state (row-wise Adagrad: one accumulator per row) round-trips too, resharded
    assert saved["optim"].keys() == loaded["optim"].keys() and saved["optim"]
    for k, t in saved["optim"].items():
        assert (t > 0).any()  # the step touched some rows
        torch.testing.assert_close(loaded["optim"][k], t, rtol=0, atol=0)


def _dp_worker(rank, world, port, mode, sharding_type, ckpt, out):
    dmp = _sharded_bpr(rank, world, port, mode, sharding_type, "exact_sgd", 0.0)
    if mode == "save":
        save_sharded(dmp, ckpt)
    else:
        load_sharded(dmp, ckpt)
    if rank == 0:
        torch.save(dense_state_dict(dmp), out)
    else:
        dense_state_dict(dmp)  # collective
    dist.destroy_process_group()


def test_replicated_teacher_loads_row_wise(tmp_path, spawn):
    """A teacher trained with replicated (data_parallel) tables, e.g. with the dense Adam of the paper's code, is
    ranked and distilled with its tables row-wise sharded: DCP reshards the replicated tensors on load."""
    ckpt = tmp_path / "ckpt"
    spawn(_dp_worker, lambda port: (1, port, "save", "data_parallel", str(ckpt), str(tmp_path / "s.pt")), 1)
    spawn(_dp_worker, lambda port: (2, port, "load", "row_wise", str(ckpt), str(tmp_path / "l.pt")), 2)
    saved, loaded = torch.load(tmp_path / "s.pt"), torch.load(tmp_path / "l.pt")
    assert saved.keys() == loaded.keys() and any("embeddings" in k for k in saved)
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
