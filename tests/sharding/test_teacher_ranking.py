"""The teacher's ranking artifact (top-N without train items, user/item neighbours after PCA) computed on 2 gloo
ranks from a sharded checkpoint equals a brute-force dense computation on the same weights, for BPR and NeuMF."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rayrec.config import RankConfig
from rayrec.models import BPR, NeuMF
from rayrec.teacher.rank import _read_lists

U, I, D, N, K = 13, 29, 8, 7, 4


def _dense(name):
    torch.manual_seed(0)
    m = BPR(U, I, D, init_std=0.5) if name == "bpr" else NeuMF(U, I, D, init_std=0.5)
    with torch.no_grad():  # a duplicated item row: its twin is at distance 0, self must still be excluded
        for t in ([m.item_emb] if name == "bpr" else [m.gmf_item, m.mlp_item]):
            t.weight[5] = t.weight[3]
    return m


def _sharded_keys(name, dense):
    sd = dense.state_dict()
    if name == "bpr":
        return {"model.ec.embeddings.user.weight": sd["user_emb.weight"],
                "model.ec.embeddings.item.weight": sd["item_emb.weight"]}
    out = {f"model.ec.embeddings.{k}.weight": sd[f"{k}.weight"] for k in ("gmf_user", "gmf_item", "mlp_user", "mlp_item")}
    out.update({f"model.{k}": v for k, v in sd.items() if k.startswith(("mlp.", "predict."))})
    return out


def _train_csr():
    g = torch.Generator().manual_seed(1)
    indptr, cols = [0], []
    for _ in range(U):
        c = torch.randperm(I, generator=g)[: int(torch.randint(1, 9, (1,), generator=g))].sort().values
        cols.append(c)
        indptr.append(indptr[-1] + len(c))
    return torch.tensor(indptr), torch.cat(cols)


def _worker(rank, world, port, name, ckpt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rayrec.models import build_model
    from rayrec.sharding import load_dense_state_dict, shard_model
    from rayrec.sharding.checkpoint import save_sharded
    from rayrec.teacher import load_frozen_teacher
    from rayrec.teacher.rank import rank_blocks, teacher_blocks
    from rayrec.train.task import TrainTask

    # a teacher "trained" table-wise; ranking reloads it row-wise (DCP reshards)
    trained = shard_model(TrainTask(build_model(name, U, I, D, sharded=True)), sharding_type="table_wise",
                          optimizer="exact_sgd", lr=0.0)
    load_dense_state_dict(trained, _sharded_keys(name, _dense(name)))
    save_sharded(trained, ckpt)
    teacher = load_frozen_teacher(ckpt, name=name, num_users=U, num_items=I, dim=D)
    blocks = teacher_blocks(teacher, name, D)
    rc = RankConfig(top_n=N, user_chunk=3, user_neighbors=K, item_neighbors=K, neighbor_pca=5)
    with torch.no_grad():
        rank_blocks(blocks, rc, U, I, out, _train_csr(), rank)
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


def _pca(x, k):
    xc = (x - x.mean(0)).double()
    _, _, vt = torch.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:k].T


def _brute_neighbors(feats, k):
    d = torch.cdist(feats, feats) ** 2
    d.fill_diagonal_(torch.inf)
    return torch.topk(-d, k, dim=1)


@pytest.mark.parametrize("name", ["bpr", "neumf"])
def test_teacher_ranking_equals_brute_force(tmp_path, spawn, name):
    out = tmp_path / "ranking"
    spawn(_worker, lambda port: (2, port, name, str(tmp_path / "ckpt"), out))
    assert sorted(p.name for p in (out / "topn").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]

    dense = _dense(name).eval()
    indptr, indices = _train_csr()
    with torch.no_grad():
        s = dense.score_all(torch.arange(U)).double()  # [U, I]
    for u in range(U):
        s[u, indices[indptr[u] : indptr[u + 1]]] = -torch.inf
    want_s, want_i = torch.topk(s, N, dim=1)
    items, scores = _read_lists(out / "topn", "user", "items", U)
    # same scores in the same order; each returned item has the returned score (items 3 and 5 tie: either order)
    np.testing.assert_allclose(scores, want_s.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(s.numpy(), items, 1), want_s.numpy(), rtol=1e-5, atol=1e-5)
    for u in range(U):  # distinct, never a train item
        assert len(set(items[u].tolist())) == N
        assert not set(items[u].tolist()) & set(indices[indptr[u] : indptr[u + 1]].tolist())

    if name == "bpr":
        reps = {"user": dense.user_emb.weight, "item": dense.item_emb.weight}
    else:
        reps = {"user": torch.cat([dense.gmf_user.weight, dense.mlp_user.weight], 1),
                "item": torch.cat([dense.gmf_item.weight, dense.mlp_item.weight], 1)}
    for kind, n in (("user", U), ("item", I)):
        want_s, want_i = _brute_neighbors(_pca(reps[kind].detach(), 5), K)
        got_i, got_s = _read_lists(out / f"{kind}_neighbors", kind, "neighbors", n)
        np.testing.assert_allclose(got_s, want_s.numpy(), rtol=1e-4, atol=1e-4)
        if kind == "user":  # no ties among users
            np.testing.assert_array_equal(got_i, want_i.numpy())
        assert not (got_i == np.arange(n)[:, None]).any()  # self excluded
    got_i, _ = _read_lists(out / "item_neighbors", "item", "neighbors", I)
    assert got_i[3, 0] == 5 and got_i[5, 0] == 3  # the duplicated rows find each other first, never themselves
