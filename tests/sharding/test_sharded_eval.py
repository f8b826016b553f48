"""evaluate() of a TorchRec-sharded BPR on 2 gloo ranks equals the dense model's, both protocols: the sampled
candidates scored on the rank that holds their rows, full ranking over row blocks, for row-wise, table-wise and
replicated (data_parallel) tables."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.eval.evaluate import EvalData, RowShard, evaluate
from rayrec.models import BPR
from rayrec.models.sharded import ShardedBPR
from rayrec.sharding import load_dense_state_dict, shard_model
from rayrec.sharding.plan import owned_row_block

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from test_evaluate import _tiny  # noqa: E402

CFG = EvalConfig(sampled_ks=[5], full_ks=[10])


def _dense(pd):
    torch.manual_seed(0)
    return BPR(pd.num_users, pd.num_items, 8, init_std=1.0)


def _worker(rank, port, sharding_type, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pd = _tiny(U=37, I=60, N=19)
    dense = _dense(pd)
    dmp = shard_model(ShardedBPR(pd.num_users, pd.num_items, 8), sharding_type=sharding_type, optimizer="exact_sgd",
                      lr=0.0)
    sd = dense.state_dict()
    load_dense_state_dict(dmp, {"ec.embeddings.user.weight": sd["user_emb.weight"],
                                "ec.embeddings.item.weight": sd["item_emb.weight"]})
    rows, offset = owned_row_block(dmp, "item")
    got = {split: evaluate(dmp.module, EvalData.from_prepared(pd), split, CFG, shard=RowShard(rows, offset),
                           lockstep=True) for split in ("valid", "test")}
    torch.save({"got": got, "rows": rows.shape[0]}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_wise", "data_parallel"])
def test_sharded_evaluation_equals_dense(tmp_path, sharding_type, spawn):
    out = str(tmp_path / "o")
    spawn(_worker, lambda port: (port, sharding_type, out))
    pd = _tiny(U=37, I=60, N=19)
    dense = _dense(pd)
    res = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert sum(r["rows"] for r in res) == pd.num_items  # every item row owned by exactly one rank
    for split in ("valid", "test"):
        want = evaluate(dense, EvalData.from_prepared(pd), split, CFG)
        for r in res:
            assert r["got"][split].keys() == want.keys()
            for k in want:
                assert r["got"][split][k] == pytest.approx(want[k], abs=1e-9), (split, k)
