"""TorchRec-sharded BPR/NeuMF on 2 gloo ranks equal the dense models on the same weights, for every sharding type."""

import os

import pytest
import torch
import torch.distributed as dist

from rayrec.models import BPR, NeuMF
from rayrec.models.sharded import ShardedBPR, ShardedNeuMF
from rayrec.sharding import dense_state_dict, load_dense_state_dict, shard_model

U, I, D = 13, 29, 8



def _dense(name):
    torch.manual_seed(0)
    return BPR(U, I, D, init_std=0.5) if name == "bpr" else NeuMF(U, I, D, init_std=0.5)


def _to_sharded_keys(name, dense):
    sd = dense.state_dict()
    if name == "bpr":
        return {"ec.embeddings.user.weight": sd["user_emb.weight"], "ec.embeddings.item.weight": sd["item_emb.weight"]}
    out = {f"ec.embeddings.{k}.weight": sd[f"{k}.weight"] for k in ("gmf_user", "gmf_item", "mlp_user", "mlp_item")}
    out.update({k: v for k, v in sd.items() if k.startswith(("mlp.", "predict."))})
    return out


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, U, (5,), generator=g), torch.randint(0, I, (5, 3), generator=g)


def _worker(rank, world, port, name, sharding_type, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ShardedBPR(U, I, D) if name == "bpr" else ShardedNeuMF(U, I, D)
    dmp = shard_model(model, sharding_type=sharding_type, optimizer="exact_sgd", lr=0.0)
    dense = _dense(name)
    load_dense_state_dict(dmp, _to_sharded_keys(name, dense))
    users, items = _batch(rank)
    with torch.no_grad():
        scores = dmp.module.score(users, items)
        u_repr = dmp.module.user_repr(users)
    gathered = dense_state_dict(dmp)
    torch.save({"scores": scores, "u_repr": u_repr, "gathered": gathered}, f"{out}.{rank}")
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "name, sharding_type",
    # data_parallel runs through the one-id-per-row KJT layout (TorchRec 1.8's CPU dense kernel, see models/sharded)
    [("bpr", "row_wise"), ("bpr", "table_wise"), ("bpr", "column_wise"), ("bpr", "data_parallel"),
     ("neumf", "row_wise"), ("neumf", "column_wise"), ("neumf", "table_wise"), ("neumf", "data_parallel")],
)
def test_sharded_forward_equals_dense(tmp_path, name, sharding_type, spawn):
    out = str(tmp_path / "o")
    spawn(_worker, lambda port: (2, port, name, sharding_type, out))
    dense = _dense(name)
    want_sd = _to_sharded_keys(name, dense)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        users, items = _batch(rank)
        with torch.no_grad():
            torch.testing.assert_close(got["scores"], dense.score(users, items), rtol=1e-5, atol=1e-6)
            want_u = dense.user_repr(users)
        for k in want_u:
            torch.testing.assert_close(got["u_repr"][k], want_u[k])
        for k, v in want_sd.items():  # the dense export round-trips the weights
            torch.testing.assert_close(got["gathered"][k], v)
