"""Sharded DCP checkpoints round-trip across world sizes and sharding types (2 -> 1, 2 -> 2 other plan, 1 -> 2)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayrec.models.sharded import ShardedBPR
from rayrec.sharding import dense_state_dict, shard_model
from rayrec.sharding.checkpoint import load_sharded, save_sharded

U, I, D = 11, 23, 4



def _worker(rank, world, port, mode, sharding_type, ckpt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1234 if mode == "save" else 99)  # different init: a load must overwrite everything
    dmp = shard_model(ShardedBPR(U, I, D, init_std=0.3), sharding_type=sharding_type, optimizer="exact_sgd", lr=0.0)
    if mode == "save":
        save_sharded(dmp, ckpt, extra={"epoch": 7, "world": world})
        files = sorted(p.name for p in __import__("pathlib").Path(ckpt).iterdir())
        extra = None
    else:
        extra = load_sharded(dmp, ckpt)
        files = None
    full = dense_state_dict(dmp)
    if rank == 0:
        torch.save({"full": full, "files": files, "extra": extra}, out)
    dist.destroy_process_group()


def _run(world, mode, sharding_type, ckpt, out):
    with socket.socket() as s:  # a fresh rendezvous port for each of the two process groups
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, mode, sharding_type, str(ckpt), str(out)), nprocs=world, join=True)
    return torch.load(out)


@pytest.mark.parametrize("save_world, load_world, load_type", [(2, 1, "row_wise"), (2, 2, "table_wise"), (1, 2, "row_wise")])
def test_round_trip_across_world_sizes(tmp_path, save_world, load_world, load_type):
    ckpt = tmp_path / "ckpt"
    saved = _run(save_world, "save", "row_wise", ckpt, tmp_path / "saved.pt")
    assert ".metadata" in saved["files"] and "extra.json" in saved["files"]
    assert sum(f.endswith(".distcp") for f in saved["files"]) == save_world  # each rank wrote its own shards
    assert not (tmp_path / ".ckpt.tmp").exists()
    loaded = _run(load_world, "load", load_type, ckpt, tmp_path / "loaded.pt")
    assert loaded["extra"] == {"epoch": 7, "world": save_world}
    for k, v in saved["full"].items():
        torch.testing.assert_close(loaded["full"][k], v, rtol=0, atol=0)
