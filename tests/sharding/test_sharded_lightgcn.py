"""A LightGCN whose tables are sharded over 2 gloo ranks equals the dense LightGCN on the same weights: propagated
representations, scores, the teacher's distributed top-k, the fused SGD update of a BPR step, with no rank ever
holding more than its own row block (plus the partial sums of one propagation step)."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rayrec.models import build_model
from rayrec.models.lightgcn import LightGCN
from rayrec.models.sharded_lightgcn import ShardedLightGCN
from rayrec.sharding import dense_state_dict, load_dense_state_dict, local_row_block, shard_model
from rayrec.sharding.ranking import sharded_topk
from rayrec.teacher.rank import teacher_blocks

U, I, D, L, LR, W = 30, 40, 8, 2, 0.5, 2


def _graph():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, U - 1, 160), rng.integers(0, I - 1, 160)  # user U-1 and item I-1 isolated
    return users, items


def _dense():
    torch.manual_seed(0)
    return LightGCN(U, I, D, init_std=0.3, layers=L, train_users=_graph()[0], train_items=_graph()[1])


def _batch(rank, step=0):
    g = torch.Generator().manual_seed(100 + 10 * step + rank)
    return torch.randint(0, U, (5,), generator=g), torch.randint(0, I, (5,), generator=g), \
        torch.randint(0, I, (5, 3), generator=g)


def _weights(dense):
    return {"ec.embeddings.user.weight": dense.user_emb.weight.detach().clone(),
            "ec.embeddings.item.weight": dense.item_emb.weight.detach().clone()}


class _Recorder:
    """Wraps the float collectives of torch.distributed to record the row counts every rank sends and receives."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
             "reduce_scatter", "reduce_scatter_tensor")

    def __init__(self):
        self.calls, self._orig = [], {}

    def __enter__(self):
        for name in self.NAMES:
            orig = self._orig[name] = getattr(dist, name)

            def wrapped(*args, _name=name, _orig=orig, **kw):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                self.calls.append((_name, [tuple(t.shape) for t in tensors if t.is_floating_point()]))
                return _orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _worker(rank, world, port, sharding_type, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_model("lightgcn", U, I, D, init_std=0.3, sharded=True, layers=L, graph=_graph())
    assert isinstance(model, ShardedLightGCN)
    dmp = shard_model(model, sharding_type=sharding_type, optimizer="exact_sgd", lr=LR)
    load_dense_state_dict(dmp, _weights(_dense()))
    m = dmp.module
    res = {"blocks": {t: tuple(local_row_block(dmp, t)[0].shape) + (local_row_block(dmp, t)[1],) for t in m.KEYS}}
    users, pos, neg = _batch(rank)
    items = torch.cat([pos.unsqueeze(1), neg], 1)

    # (a) forward: propagated blocks, lookups, scores; both exchange schedules
    m.eval()
    for exchange in ("all_to_all", "rounds"):
        m.exchange = exchange
        m.clear_cache()
        with torch.no_grad(), _Recorder() as rec:
            (ub, uo), (ib, io) = m.propagated_blocks()
            res[exchange] = {"users": ub.clone(), "user_offset": uo, "items": ib.clone(), "item_offset": io,
                             "user_repr": m.user_repr(users)["emb"], "item_repr": m.item_repr(items)["emb"],
                             "score": m.score(users, items)}
            n_before = len(rec.calls)
            m.item_repr(items)  # served from the eval-mode cache: only the three exchanges of the lookup
            res[exchange]["cached_calls"] = [c[0] for c in rec.calls[n_before:]]
        res[exchange]["calls"] = rec.calls
    res["empty_blocks"] = sum(b is None for b in m._column_blocks())  # e.g. a rank's users in its own users' columns
    with torch.no_grad():
        res["layer0"] = m.user_repr(users, layer=0)["emb"]
    # the teacher ranking step: this rank's propagated blocks, distributed top-k of its own users
    blocks = teacher_blocks(SimpleNamespace(dmp=dmp, model=m), "lightgcn", D)
    own = torch.arange(blocks.user_offset, blocks.user_offset + len(blocks.users))
    res["topk"] = sharded_topk(blocks.users, own, blocks.items, blocks.item_offset, 5)

    # (b) one BPR step per exchange schedule: fused EXACT_SGD (gradients averaged over ranks, so each rank's
    # summed loss is scaled by W, as TrainTask does), then the gathered tables
    m.train()
    for step, exchange in enumerate(("all_to_all", "rounds")):
        m.exchange = exchange
        u, p, n = _batch(rank, step)
        with _Recorder() as rec:
            (m.base_loss(u, p, n) * world).backward()
        res[f"step{step}_calls"] = rec.calls
        res[f"step{step}"] = dense_state_dict(dmp)
    if sharding_type == "table_wise":  # replicated tables have no row blocks: refused, on every rank alike
        other = build_model("lightgcn", U, I, D, sharded=True, layers=L, graph=_graph())
        dp = shard_model(other, sharding_type="data_parallel", optimizer="exact_sgd", lr=0.0)
        try:
            dp.module.score(users, items)
        except ValueError as e:
            res["dp_error"] = str(e)
    torch.save(res, f"{out}.{rank}")
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_wise"])
def test_sharded_lightgcn_equals_dense(tmp_path, spawn, sharding_type):
    out = str(tmp_path / "o")
    spawn(_worker, lambda port: (W, port, sharding_type, out), W)
    got = [torch.load(f"{out}.{r}") for r in range(W)]
    dense = _dense()
    with torch.no_grad():
        Ud, Id = dense.propagate()  # [U, D], [I, D]

    # (c) every rank holds exactly its row block of each table; together they tile the tables
    for t, n in (("user", U), ("item", I)):
        sizes = [g["blocks"][t][0] for g in got]
        assert sum(sizes) == n and all(g["blocks"][t][1] == D for g in got)
        if sharding_type == "row_wise":
            assert max(sizes) < n  # no rank holds a whole table
    for r, g in enumerate(got):
        U_r, _, u0 = g["blocks"]["user"]
        I_r, _, i0 = g["blocks"]["item"]
        n_r = U_r + I_r
        users, pos, neg = _batch(r)
        items = torch.cat([pos.unsqueeze(1), neg], 1)
        for exchange in ("all_to_all", "rounds"):
            a = g[exchange]
            # (a) propagated blocks and lookups equal the dense model
            assert a["users"].shape == (U_r, D) and a["items"].shape == (I_r, D)
            assert (a["user_offset"], a["item_offset"]) == (u0, i0)
            torch.testing.assert_close(a["users"], Ud[u0:u0 + U_r], atol=1e-5, rtol=0)
            torch.testing.assert_close(a["items"], Id[i0:i0 + I_r], atol=1e-5, rtol=0)
            with torch.no_grad():
                torch.testing.assert_close(a["user_repr"], dense.user_repr(users)["emb"], atol=1e-5, rtol=0)
                torch.testing.assert_close(a["item_repr"], dense.item_repr(items)["emb"], atol=1e-5, rtol=0)
                torch.testing.assert_close(a["score"], dense.score(users, items), atol=1e-5, rtol=0)
            assert a["cached_calls"] == ["all_to_all_single"] * 3
            # (c) rows only move by all_to_all: never an all-gather/all-reduce of rows; the largest buffer is
            # the partial sums [N, D] (received: W own blocks [W·n_r, D]); with rounds one block [n_s, D]
            N, n_max = U + I, max(gg["blocks"]["user"][0] + gg["blocks"]["item"][0] for gg in got)
            bound = max(N, W * n_r) if exchange == "all_to_all" else max(n_max, users.numel() + items.numel())
            for name, shapes in a["calls"]:
                assert name == "all_to_all_single" or not shapes, (name, shapes)
                assert all(s[0] <= bound for s in shapes), (name, shapes, bound)
            assert (N, D) in {s for _, shapes in a["calls"] for s in shapes} or exchange == "rounds" or W * n_r == 0
        with torch.no_grad():
            torch.testing.assert_close(g["layer0"], dense.user_emb(users))
        top_s, top_i = torch.topk(Ud[u0:u0 + U_r] @ Id.T, 5, dim=1)  # ranking: the dense model's top-5
        torch.testing.assert_close(g["topk"][0], top_s, atol=1e-5, rtol=0)
        assert torch.equal(g["topk"][1], top_i)
        for step in (0, 1):
            assert all(name == "all_to_all_single" or not shapes for name, shapes in g[f"step{step}_calls"])

    if sharding_type == "table_wise":
        assert all("contiguous row blocks" in g["dp_error"] for g in got)
        # whole tables on ranks: some rank's column block has rows of no rank-s nodes (an empty block, no matmul)
        assert sum(g["empty_blocks"] for g in got) > 0

    # (b) the fused SGD steps equal dense SGD on the sum of both ranks' batch losses
    opt = torch.optim.SGD(dense.parameters(), lr=LR)
    for step in (0, 1):
        opt.zero_grad()
        sum(dense.base_loss(*_batch(r, step)) for r in range(W)).backward()
        opt.step()
        want = _weights(dense)
        for g in got:
            for k, v in want.items():
                torch.testing.assert_close(g[f"step{step}"][k], v, atol=1e-5, rtol=0)
    assert not torch.equal(want["ec.embeddings.user.weight"], _weights(_dense())["ec.embeddings.user.weight"])


def test_single_process_equals_dense_and_refuses_without_graph():
    """World size 1 (no process group, an unsharded collection): the same maths, no collectives."""
    dense = _dense()
    m = ShardedLightGCN(U, I, D, layers=L, graph=_graph(), device="cpu")
    with torch.no_grad():
        m.ec.embeddings["user"].weight.copy_(dense.user_emb.weight)
        m.ec.embeddings["item"].weight.copy_(dense.item_emb.weight)
    users, pos, neg = _batch(0)
    torch.testing.assert_close(m.base_loss(users, pos, neg), dense.base_loss(users, pos, neg), atol=1e-5, rtol=0)
    assert m.num_parameters() == (U + I) * D
    bare = ShardedLightGCN(U, I, D, layers=L, device="cpu")
    with pytest.raises(RuntimeError, match="no train graph"):
        bare.score(users, neg)


def test_config_accepts_row_blocks_only(tmp_path):
    from rayrec.config import CONFIG_DIR, load_config
    from rayrec.errors import ConfigError
    from rayrec.train.fit import validate

    def cfg(*o):
        return load_config([CONFIG_DIR / "data/ml100k.yaml", CONFIG_DIR / "model/bpr_d20.yaml"],
                           [f"storage_root={tmp_path}", "name=t", "model.name=lightgcn", "model.dim=8", *o])

    validate(cfg("model.sharding=row_wise", "eval.full=false"))
    validate(cfg("model.sharding=table_wise", "eval.full=false"))
    with pytest.raises(ConfigError, match="row blocks"):
        validate(cfg("model.sharding=column_wise", "eval.full=false"))
    validate(cfg("model.sharding=row_wise"))  # full ranking over the propagated item blocks
    with pytest.raises(ConfigError, match="full ranking of a sharded model"):
        validate(cfg("model.sharding=table_wise", "model.name=neumf"))
    validate(cfg("model.sharding=data_parallel", "model.name=neumf"))  # replicated tables: rank 0's rows
    validate(cfg("model.sharding=data_parallel", "model.name=bpr"))
    with pytest.raises(ConfigError, match="full ranking of a sharded model"):
        validate(cfg("model.sharding=column_wise", "model.name=bpr"))
