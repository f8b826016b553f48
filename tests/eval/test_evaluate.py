"""evaluate(): sampled and full protocols against a brute-force loop, and sharded over 2 gloo ranks."""

import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.eval.evaluate import EvalData, evaluate
from rayrec.models import BPR


def _tiny(seed=0, U=23, I=40, N=9):
    rng = np.random.default_rng(seed)
    tu, ti, vu, vi, su, si, neg = [], [], [], [], [], [], []
    for u in range(U):
        items = rng.choice(I, size=rng.integers(4, 9), replace=False)
        vu.append(u), vi.append(items[0]), su.append(u), si.append(items[1])
        tu += [u] * (len(items) - 2)
        ti += list(items[2:])
        rest = np.setdiff1d(np.arange(I), items)
        neg.append(rng.choice(rest, size=N, replace=False))
    pd = types.SimpleNamespace(
        num_users=U, num_items=I, negatives=np.array(neg),
        train_user=np.array(tu), train_item=np.array(ti),
        valid_user=np.array(vu), valid_item=np.array(vi), test_user=np.array(su), test_item=np.array(si),
    )
    return pd


def _brute(model, pd, split):
    truth = dict(zip(pd.valid_user, pd.valid_item)) if split == "valid" else dict(zip(pd.test_user, pd.test_item))
    S = model.score_all(torch.arange(pd.num_users)).detach()
    out = {"H@5": [], "N@5": [], "Recall@10": [], "NDCG@10": []}
    for u in range(pd.num_users):
        t = truth[u]
        s_pos = S[u, t]
        negs = S[u, pd.negatives[u]]
        rank = 1 + int((negs >= s_pos).sum())  # pessimistic
        out["H@5"].append(float(rank <= 5))
        out["N@5"].append(1 / np.log2(rank + 1) if rank <= 5 else 0.0)
        masked = set(pd.train_item[pd.train_user == u])
        if split == "test":
            masked |= set(pd.valid_item[pd.valid_user == u])
        others = [S[u, j] for j in range(pd.num_items) if j not in masked and j != t]
        full_rank = 1 + sum(float(x >= s_pos) for x in others)
        out["Recall@10"].append(float(full_rank <= 10))
        out["NDCG@10"].append(1 / np.log2(full_rank + 1) if full_rank <= 10 else 0.0)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("split", ["valid", "test"])
def test_matches_brute_force(split):
    pd = _tiny()
    model = BPR(pd.num_users, pd.num_items, 4, init_std=1.0)
    cfg = EvalConfig(sampled_ks=[5], full_ks=[10], memory_budget_mb=1)
    got = evaluate(model, EvalData.from_prepared(pd), split, cfg)
    want = _brute(model, pd, split)
    prefix = "full" if split == "test" else "full_valid"
    assert got[f"{split}/H@5"] == pytest.approx(want["H@5"])
    assert got[f"{split}/N@5"] == pytest.approx(want["N@5"])
    assert got[f"{prefix}/Recall@10"] == pytest.approx(want["Recall@10"])
    assert got[f"{prefix}/NDCG@10"] == pytest.approx(want["NDCG@10"])


def test_full_ranking_on_cpu_caps_the_score_block_and_keeps_the_metrics(monkeypatch):
    import rayrec.eval.evaluate as ev

    pd = _tiny()
    model = BPR(pd.num_users, pd.num_items, 4, init_std=1.0)
    cfg = EvalConfig(sampled=False, full_ks=[10])  # 256 MiB: every user in one chunk
    fused = evaluate(model, EvalData.from_prepared(pd), "test", cfg)  # BPR on CPU: counted without a score block
    monkeypatch.setattr(ev, "_dot_ranking_tables", lambda m: None)  # the score blocks, whose size is tested here
    calls = []
    real = model.score_all
    monkeypatch.setattr(model, "score_all", lambda u: calls.append(len(u)) or real(u))
    whole = evaluate(model, EvalData.from_prepared(pd), "test", cfg)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(ev, "CPU_FULL_BLOCK_MB", 1e-6)  # the cap wins over the budget: one user per chunk
    capped = evaluate(model, EvalData.from_prepared(pd), "test", cfg)
    assert len(calls) > 1 and set(calls) == {1}
    assert capped == pytest.approx(whole)
    assert fused == pytest.approx(whole) and 0 < whole["full/Recall@10"] < 1


def test_one_eval_data_serves_every_split_user_set_and_weight_change():
    """EvalData keeps the checked held-out items and exclusions between evaluations (a run evaluates every epoch):
    after the weights change, and between splits and user sets, each result equals a fresh EvalData's."""
    pd = _tiny(seed=3)
    keep = pd.test_user % 4 != 0  # a quarter of the users without a test item
    pd.test_user, pd.test_item = pd.test_user[keep], pd.test_item[keep]
    model = BPR(pd.num_users, pd.num_items, 4, init_std=1.0)
    data = EvalData.from_prepared(pd)
    for step in range(2):
        for split in ("valid", "test"):
            for who in ("skip", "zero"):
                cfg = EvalConfig(sampled=False, full_ks=[5, 10], users_without_truth=who)
                assert evaluate(model, data, split, cfg) == evaluate(model, EvalData.from_prepared(pd), split, cfg)
        with torch.no_grad():  # a training step
            model.item_emb.weight.add_(torch.randn_like(model.item_emb.weight))
    assert len(data._rankers) == 2  # one per split, rebuilt when the user set changes


def test_constant_model_scores_zero():
    pd = _tiny()
    model = BPR(pd.num_users, pd.num_items, 4)
    with torch.no_grad():
        model.user_emb.weight.zero_()
    got = evaluate(model, EvalData.from_prepared(pd), "test", EvalConfig(sampled_ks=[5, 9], full_ks=[10]))  # N=9: rank N+1=10 misses @9
    assert all(v == 0.0 for k, v in got.items()), got



def _rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    pd = _tiny()
    model = BPR(pd.num_users, pd.num_items, 4, init_std=1.0)
    got = evaluate(model, EvalData.from_prepared(pd), "test", EvalConfig(sampled_ks=[5], full_ks=[10]))
    torch.save(got, f"{out}.{rank}")
    dist.barrier()  # no rank tears the group down while a peer is still mid-collective
    dist.destroy_process_group()


def test_sharded_over_two_ranks_equals_single_process(tmp_path, spawn):
    out = str(tmp_path / "m")
    spawn(_rank, lambda port: (port, out))
    torch.manual_seed(0)
    pd = _tiny()
    model = BPR(pd.num_users, pd.num_items, 4, init_std=1.0)
    single = evaluate(model, EvalData.from_prepared(pd), "test", EvalConfig(sampled_ks=[5], full_ks=[10]))
    for r in (0, 1):
        got = torch.load(f"{out}.{r}")
        assert got.keys() == single.keys()
        for k in single:
            assert got[k] == pytest.approx(single[k]), k


def test_dense_neumf_scores_candidates_through_item_keys():
    # NeuMF's sampled evaluation goes through its split head (item keys once, O(D) per candidate): the same
    # metrics as scoring every candidate through the full MLP
    from rayrec.models import NeuMF

    class FullMLP(NeuMF):
        row_scorer = None  # evaluate() falls back to model.score

    pd = _tiny(U=37, I=60, N=19)
    torch.manual_seed(0)
    fast = NeuMF(pd.num_users, pd.num_items, 8, init_std=1.0)
    with torch.no_grad():
        fast.mlp.bias.normal_()
    slow = FullMLP(pd.num_users, pd.num_items, 8)
    slow.load_state_dict(fast.state_dict())
    cfg = EvalConfig(sampled_ks=[5, 10], full=False)
    for split in ("valid", "test"):
        want = evaluate(slow, EvalData.from_prepared(pd), split, cfg)
        got = evaluate(fast, EvalData.from_prepared(pd), split, cfg)
        assert got.keys() == want.keys() and want[f"{split}/H@10"] > 0
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-9), k
    head, keys = fast.row_scorer()
    users, cand = torch.arange(5), torch.randint(0, pd.num_items, (5, 7))
    q = head.query_repr(fast.user_repr(users))
    got = head.pairs(q, keys, torch.arange(5).repeat_interleave(7), cand.reshape(-1)).view(5, 7)
    torch.testing.assert_close(got, fast.score(users, cand).detach(), rtol=1e-5, atol=1e-5)
