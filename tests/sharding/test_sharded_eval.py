"""evaluate() of a TorchRec-sharded BPR or NeuMF on 2 gloo ranks equals the dense model's, both protocols: the
sampled candidates scored on the rank that holds their rows (NeuMF through its split head), full ranking over row
blocks, for row-wise, table-wise and replicated (data_parallel) tables."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.eval.evaluate import EvalData, evaluate
from rayrec.models import BPR, NeuMF
from rayrec.models.sharded import ShardedBPR, ShardedNeuMF
from rayrec.sharding import load_dense_state_dict, shard_model
from rayrec.train.weights import ShardedWeights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from test_evaluate import _tiny  # noqa: E402

CFG = EvalConfig(sampled_ks=[5], full_ks=[10])


def _dense(pd, name):
    torch.manual_seed(0)
    if name == "bpr":
        return BPR(pd.num_users, pd.num_items, 8, init_std=1.0)
    model = NeuMF(pd.num_users, pd.num_items, 8, init_std=1.0)
    with torch.no_grad():  # a non-trivial head: biases and both halves of the MLP matter
        model.mlp.bias.normal_()
        model.predict.bias.fill_(0.3)
    return model


def _worker(rank, port, name, sharding_type, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pd = _tiny(U=37, I=60, N=19)
    dense = _dense(pd, name)
    sharded = (ShardedBPR if name == "bpr" else ShardedNeuMF)(pd.num_users, pd.num_items, 8)
    dmp = shard_model(sharded, sharding_type=sharding_type, optimizer="exact_sgd", lr=0.0)
    sd = dense.state_dict()
    if name == "bpr":
        sd = {"ec.embeddings.user.weight": sd["user_emb.weight"], "ec.embeddings.item.weight": sd["item_emb.weight"]}
    else:
        sd = {(f"ec.embeddings.{k}" if k.split(".")[0].endswith(("_user", "_item")) else k): v for k, v in sd.items()}
    load_dense_state_dict(dmp, sd)
    shard = ShardedWeights(dmp).item_row_shard()
    got = {split: evaluate(dmp.module, EvalData.from_prepared(pd), split, CFG, shard=shard, lockstep=True)
           for split in ("valid", "test")}
    torch.save({"got": got, "rows": shard.rows.shape[0]}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("name,sharding_type", [("bpr", "row_wise"), ("bpr", "table_wise"), ("bpr", "data_parallel"),
                                               ("neumf", "row_wise"), ("neumf", "data_parallel")])
def test_sharded_evaluation_equals_dense(tmp_path, name, sharding_type, spawn):
    out = str(tmp_path / "o")
    spawn(_worker, lambda port: (port, name, sharding_type, out))
    pd = _tiny(U=37, I=60, N=19)
    dense = _dense(pd, name)
    res = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert sum(r["rows"] for r in res) == pd.num_items  # every item row owned by exactly one rank
    for split in ("valid", "test"):
        want = evaluate(dense, EvalData.from_prepared(pd), split, CFG)
        for r in res:
            assert r["got"][split].keys() == want.keys()
            for k in want:
                assert r["got"][split][k] == pytest.approx(want[k], abs=1e-9), (split, k)
