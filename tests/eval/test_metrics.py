"""Tests of rayrec.eval.metrics: hand-computed cases, torchmetrics cross-checks, chunking. Fast and seeded."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalRecall,
)

from rayrec.eval import (
    chunk_size_for,
    full_ranking_metrics,
    masked_topk,
    sampled_metrics,
    sampled_ranks,
    select_csr_rows,
)

T = torch.tensor


def approx(x: torch.Tensor | float, expected: list[float] | float, tol: float = 1e-6) -> bool:
    x = torch.as_tensor(x, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    return torch.allclose(x, e, atol=tol, rtol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------------------------
# sampled protocol: hand-computed
# ------------------------------------------------------------------------------------------------------------------
def test_sampled_ranks_pessimistic_ties() -> None:
    pos = T([0.5, 0.5, 1.0, 0.1])
    neg = T([[0.5, 0.2, 0.9], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]])
    ranks = sampled_ranks(pos, neg)
    assert ranks.dtype == torch.int64
    # 0.5 vs [0.5 (tie -> above), 0.2, 0.9] -> 3; strictly best -> 1; all tied -> N + 1 = 4
    assert ranks.tolist() == [3, 1, 1, 4]


def test_sampled_ranks_nan_never_helps() -> None:
    pos = T([float("nan"), 0.5, float("nan")])
    neg = T([[0.1, 0.2, 0.3], [float("nan"), 0.1, 0.2], [float("nan"), float("nan"), float("nan")]])
    # NaN positive -> N + 1; a NaN negative counts as above the positive
    assert sampled_ranks(pos, neg).tolist() == [4, 2, 4]


def test_sampled_metrics_exact_values() -> None:
    ranks = T([1, 2, 3, 5, 11])
    m = sampled_metrics(ranks, [1, 3, 5, 10])
    assert set(m) == {f"{n}@{k}" for n in ("H", "N", "M") for k in (1, 3, 5, 10)}
    assert m["H@1"].tolist() == [1, 0, 0, 0, 0]
    assert m["H@3"].tolist() == [1, 1, 1, 0, 0]
    assert m["H@5"].tolist() == [1, 1, 1, 1, 0]
    assert m["H@10"].tolist() == [1, 1, 1, 1, 0]
    # 1/log2(2) = 1, 1/log2(3) = 0.6309297535714575, 1/log2(4) = 0.5, 1/log2(6) = 0.3868528072345416
    assert approx(m["N@1"], [1.0, 0, 0, 0, 0])
    assert approx(m["N@3"], [1.0, 0.6309297535714575, 0.5, 0, 0])
    assert approx(m["N@5"], [1.0, 0.6309297535714575, 0.5, 0.3868528072345416, 0])
    assert approx(m["M@3"], [1.0, 0.5, 1 / 3, 0, 0])
    assert approx(m["M@10"], [1.0, 0.5, 1 / 3, 0.2, 0])
    for v in m.values():
        assert v.shape == (5,) and v.dtype == torch.float32


def test_sampled_constant_model_scores_zero() -> None:
    torch.manual_seed(0)
    b, n = 16, 100
    ranks = sampled_ranks(torch.full((b,), 0.3), torch.full((b, n), 0.3))
    assert (ranks == n + 1).all()
    for key, v in sampled_metrics(ranks, [1, 10, 50, 100]).items():
        assert (v == 0).all(), key


def test_sampled_input_validation() -> None:
    with pytest.raises(ValueError):
        sampled_ranks(T([0.1, 0.2]), T([[0.1, 0.2]]))
    with pytest.raises(ValueError):
        sampled_metrics(T([0, 1]), [1])
    with pytest.raises(ValueError):
        sampled_metrics(T([1, 2]), [0])
    with pytest.raises(ValueError):
        sampled_metrics(T([1, 2]), [])


# ------------------------------------------------------------------------------------------------------------------
# full-ranking protocol: hand-computed
# ------------------------------------------------------------------------------------------------------------------
def test_full_two_heldout_items_hand_computed() -> None:
    # 6 items, held-out {1, 4}; ranking by score: 0 (0.9), 4 (0.8), 2 (0.7), 5 (0.6), 1 (0.5), 3 (0.1)
    scores = T([[0.9, 0.5, 0.7, 0.1, 0.8, 0.6]])
    truth = T([[1, 4]])
    m = full_ranking_metrics(scores, None, truth, [1, 2, 5, 6])
    # positions: item 4 -> 2, item 1 -> 5
    assert m["Recall@1"].tolist() == [0.0]
    assert m["HR@1"].tolist() == [0.0]
    assert m["NDCG@1"].tolist() == [0.0]
    assert approx(m["Recall@2"], [0.5])
    assert m["HR@2"].tolist() == [1.0]
    # DCG@2 = 1/log2(3); IDCG over min(2, 2) = 1 + 1/log2(3)
    assert approx(m["NDCG@2"], [(1 / math.log2(3)) / (1 + 1 / math.log2(3))])
    assert approx(m["Recall@5"], [1.0])
    # DCG@5 = 1/log2(3) + 1/log2(6); IDCG = 1 + 1/log2(3)
    expected5 = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert approx(m["NDCG@5"], [expected5])
    assert approx(m["NDCG@6"], [expected5])


def test_full_idcg_uses_min_gt_k() -> None:
    # 3 held-out items, K = 1: the item at position 1 gives NDCG@1 = 1 (IDCG over min(3, 1) = 1 term)
    scores = T([[0.9, 0.1, 0.2, 0.8, 0.7]])
    truth = T([[0, 1, 2]])
    m = full_ranking_metrics(scores, None, truth, [1, 2])
    assert approx(m["NDCG@1"], [1.0])
    assert approx(m["Recall@1"], [1 / 3])
    # positions 1, 4, 5 (items 0, 2, 1 with 3 and 4 in between); NDCG@2 = 1 / (1 + 1/log2 3)
    assert approx(m["NDCG@2"], [1.0 / (1 + 1 / math.log2(3))])
    assert approx(m["Recall@2"], [1 / 3])


def test_full_constant_model_gets_no_hits() -> None:
    # held-out items at the smallest ids: an ordinary topk/argsort would put them first
    b, i = 4, 50
    scores = torch.zeros(b, i)
    truth = T([[0, 1], [0, -1], [2, 3], [0, 1]])
    train = torch.zeros(b, i, dtype=torch.bool)
    train[:, 10:15] = True
    m = full_ranking_metrics(scores, train, truth, [1, 5, 10, 20])
    for key, v in m.items():
        assert (v == 0).all(), (key, v)
    # and the positions are the worst ones: 45 candidates -> held-out items at 44 and 45 (two of them) or 45
    m = full_ranking_metrics(scores, train, truth, [44, 45])
    assert approx(m["Recall@44"], [0.5, 0.0, 0.5, 0.5])
    assert approx(m["Recall@45"], [1.0, 1.0, 1.0, 1.0])


def test_full_ties_with_other_items_are_pessimistic() -> None:
    # held-out item 2 tied with item 0 and 3 (0.5) and below item 1 (0.9) -> position 4
    scores = T([[0.5, 0.9, 0.5, 0.5, 0.1]])
    truth = T([[2]])
    m = full_ranking_metrics(scores, None, truth, [3, 4])
    assert m["HR@3"].tolist() == [0.0]
    assert m["HR@4"].tolist() == [1.0]
    assert approx(m["NDCG@4"], [1 / math.log2(5)])


def test_full_tied_heldout_items_take_consecutive_positions() -> None:
    # two held-out items tied with each other and above everything else -> positions 1 and 2, perfect NDCG
    scores = T([[0.9, 0.9, 0.1, 0.2]])
    m = full_ranking_metrics(scores, None, T([[1, 0]]), [1, 2])
    assert approx(m["NDCG@2"], [1.0])
    assert approx(m["Recall@1"], [0.5])
    assert approx(m["NDCG@1"], [1.0])


def test_full_masking_removes_items_above() -> None:
    scores = T([[0.9, 0.8, 0.3, 0.2], [0.9, 0.8, 0.3, 0.2]])
    truth = T([[1], [1]])
    mask = T([[True, False, False, False], [False, False, False, False]])
    m = full_ranking_metrics(scores, mask, truth, [1])
    assert m["HR@1"].tolist() == [1.0, 0.0]
    assert approx(m["NDCG@1"], [1.0, 0.0])
    # same with the CSR form (duplicates allowed)
    m_csr = full_ranking_metrics(scores, (T([0, 2, 2]), T([0, 0])), truth, [1])
    assert m_csr["HR@1"].tolist() == [1.0, 0.0]
    m_kw = full_ranking_metrics(scores, None, truth, [1], mask_indptr=T([0, 2, 2]), mask_indices=T([0, 0]))
    assert m_kw["HR@1"].tolist() == [1.0, 0.0]


def test_full_masked_items_tied_at_minus_inf_do_not_count() -> None:
    # a held-out item scored -inf is still placed above masked items (they are not candidates at all)
    scores = T([[float("-inf"), 0.0, float("-inf")]])
    mask = T([[False, True, True]])
    m = full_ranking_metrics(scores, mask, T([[0]]), [1])
    assert m["HR@1"].tolist() == [1.0]


def test_full_nan_scores_never_help() -> None:
    nan = float("nan")
    scores = T([[nan, 0.1, 0.2], [0.9, nan, 0.2]])
    m = full_ranking_metrics(scores, None, T([[0], [0]]), [1, 2, 3])
    # row 0: NaN held-out -> last (3); row 1: NaN candidate above the held-out -> 2
    assert m["HR@2"].tolist() == [0.0, 1.0]
    assert m["HR@1"].tolist() == [0.0, 0.0]
    assert m["HR@3"].tolist() == [1.0, 1.0]


def test_full_users_without_truth_are_nan() -> None:
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    truth = T([[-1, -1], [3, -1], [-1, -1]])
    m = full_ranking_metrics(scores, None, truth, [5])
    for v in m.values():
        assert torch.isnan(v[0]) and torch.isnan(v[2]) and not torch.isnan(v[1])
    # no held-out column at all
    m0 = full_ranking_metrics(scores, None, torch.empty(3, 0, dtype=torch.int64), [5])
    assert all(torch.isnan(v).all() for v in m0.values())


def test_full_padding_anywhere_in_row() -> None:
    scores = torch.rand(2, 20, generator=torch.Generator().manual_seed(1))
    a = full_ranking_metrics(scores, None, T([[4, 7, -1], [2, -1, -1]]), [1, 5, 10])
    b = full_ranking_metrics(scores, None, T([[-1, 4, 7], [-1, -1, 2]]), [1, 5, 10])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_full_input_validation() -> None:
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match="masked"):
        full_ranking_metrics(scores, (T([0, 1, 1]), T([1])), T([[1], [2]]), [1])
    with pytest.raises(ValueError, match="twice"):
        full_ranking_metrics(scores, None, T([[1, 1], [2, -1]]), [1])
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, None, T([[5], [2]]), [1])  # out of range
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, None, T([[-2], [2]]), [1])  # bad padding
    with pytest.raises(ValueError):
        both = torch.zeros(2, 5, dtype=torch.bool)
        full_ranking_metrics(scores, both, T([[1], [2]]), [1], mask_indptr=T([0, 0, 0]), mask_indices=T([0]))
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, torch.zeros(2, 4, dtype=torch.bool), T([[1], [2]]), [1])  # wrong shape
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, (T([0, 1]), T([0])), T([[1], [2]]), [1])  # indptr of the wrong length
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, (T([0, 1, 1]), T([9])), T([[1], [2]]), [1])  # item id out of range


def test_full_does_not_modify_inputs() -> None:
    scores = T([[0.3, float("nan"), 0.1]])
    mask = T([[False, False, True]])
    s0, m0 = scores.clone(), mask.clone()
    full_ranking_metrics(scores, mask, T([[0]]), [1])
    masked_topk(scores, mask, 2)
    assert torch.equal(scores.isnan(), s0.isnan()) and torch.equal(scores.nan_to_num(), s0.nan_to_num())
    assert torch.equal(mask, m0)


# ------------------------------------------------------------------------------------------------------------------
# torchmetrics cross-checks (continuous random scores: no ties)
# ------------------------------------------------------------------------------------------------------------------
def _random_full_case(seed: int, b: int = 12, i: int = 60, h_max: int = 4):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, i, generator=g)
    truth = torch.full((b, h_max), -1, dtype=torch.int64)
    mask = torch.zeros(b, i, dtype=torch.bool)
    for u in range(b):
        perm = torch.randperm(i, generator=g)
        n_gt = 1 + int(torch.randint(h_max, (1,), generator=g))
        n_mask = int(torch.randint(15, (1,), generator=g))
        truth[u, :n_gt] = perm[:n_gt]
        mask[u, perm[n_gt : n_gt + n_mask]] = True
    return scores, truth, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_matches_torchmetrics(seed: int) -> None:
    scores, truth, mask = _random_full_case(seed)
    ks = [1, 3, 5, 10, 20]
    ours = full_ranking_metrics(scores, mask, truth, ks)
    for k in ks:
        ref = {
            f"Recall@{k}": RetrievalRecall(top_k=k),
            f"NDCG@{k}": RetrievalNormalizedDCG(top_k=k),
            f"HR@{k}": RetrievalHitRate(top_k=k),
        }
        for name, metric in ref.items():
            per_user = []
            for u in range(scores.shape[0]):
                keep = ~mask[u]  # masked items are not candidates
                target = torch.zeros(scores.shape[1], dtype=torch.bool)
                target[truth[u][truth[u] >= 0]] = True
                preds, tgt = scores[u][keep], target[keep]
                metric.reset()
                per_user.append(float(metric(preds, tgt, indexes=torch.zeros_like(tgt, dtype=torch.long))))
            assert approx(ours[name], per_user), (name, ours[name], per_user)

            # and the mean over all users through one metric state with `indexes`
            metric.reset()
            keep = ~mask
            target = torch.zeros_like(mask)
            rows = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(truth)
            target[rows[truth >= 0], truth[truth >= 0]] = True
            idx = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(scores)
            mean_ref = metric(scores[keep], target[keep], indexes=idx[keep])
            assert approx(ours[name].mean(), float(mean_ref)), name


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_matches_torchmetrics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, n = 20, 30
    pos = torch.rand(b, generator=g)
    neg = torch.rand(b, n, generator=g)
    ranks = sampled_ranks(pos, neg)
    # rank = 1 + #negatives above, computed independently by sorting the candidate list
    lists = torch.cat([pos.unsqueeze(1), neg], dim=1)
    order = torch.argsort(lists, dim=1, descending=True)
    assert ranks.tolist() == [int((order[u] == 0).nonzero()) + 1 for u in range(b)]

    ks = [1, 5, 10, n + 1]
    ours = sampled_metrics(ranks, ks)
    target = torch.zeros(b, n + 1, dtype=torch.bool)
    target[:, 0] = True
    idx = torch.arange(b).unsqueeze(1).expand(b, n + 1)
    for k in ks:
        for key, metric in ((f"H@{k}", RetrievalHitRate(top_k=k)), (f"N@{k}", RetrievalNormalizedDCG(top_k=k))):
            per_user = []
            for u in range(b):
                metric.reset()
                per_user.append(float(metric(lists[u], target[u], indexes=idx[u])))
            assert approx(ours[key], per_user), key
            metric.reset()
            assert approx(ours[key].mean(), float(metric(lists.flatten(), target.flatten(), indexes=idx.flatten())))
    # torchmetrics 1.0.3's RetrievalMRR has no top_k: compare only the uncut M@(N+1)
    mrr = RetrievalMRR()
    assert approx(ours[f"M@{n + 1}"].mean(), float(mrr(lists.flatten(), target.flatten(), indexes=idx.flatten())))


def test_torchmetrics_is_not_pessimistic_on_ties() -> None:
    """Documents the convention difference: torchmetrics breaks ties by argsort order, we count them against."""
    preds = torch.zeros(5)
    target = T([True, False, False, False, False])
    ours = full_ranking_metrics(preds.unsqueeze(0), None, T([[0]]), [1])
    assert ours["HR@1"].item() == 0.0
    # torchmetrics' value depends on argsort's tie order (1.0 here on CPU with torch 2.13, 0.0 for a 200-long
    # list); only check it is a valid value
    tm = float(RetrievalHitRate(top_k=1)(preds, target, indexes=torch.zeros(5, dtype=torch.long)))
    assert tm in (0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------------
# chunking, CSR helpers, topk
# ------------------------------------------------------------------------------------------------------------------
def test_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(7)
    b, i, h = 257, 300, 6
    scores = torch.rand(b, i, generator=g)
    scores[:, :50] = torch.round(scores[:, :50] * 4) / 4  # some ties, too
    truth = torch.full((b, h), -1, dtype=torch.int64)
    indptr = [0]
    indices: list[int] = []
    for u in range(b):
        perm = torch.randperm(i, generator=g)
        n_gt = int(torch.randint(h + 1, (1,), generator=g))  # 0 allowed -> NaN rows
        n_mask = int(torch.randint(40, (1,), generator=g))
        truth[u, :n_gt] = perm[:n_gt]
        indices.extend(sorted(perm[n_gt : n_gt + n_mask].tolist()))
        indptr.append(len(indices))
    indptr_t, indices_t = T(indptr), T(indices)
    ks = [1, 10, 50]
    full = full_ranking_metrics(scores, (indptr_t, indices_t), truth, ks)
    for cs in (1, 7, 64, 256, 1000):
        chunked = full_ranking_metrics(scores, (indptr_t, indices_t), truth, ks, chunk_size=cs)
        for key in full:
            assert torch.equal(full[key].isnan(), chunked[key].isnan()), (cs, key)
            assert torch.equal(full[key].nan_to_num(), chunked[key].nan_to_num()), (cs, key)

    # caller-side chunking with select_csr_rows and the boolean-mask form agree too
    dense = torch.zeros(b, i, dtype=torch.bool)
    for u in range(b):
        dense[u, indices_t[indptr[u] : indptr[u + 1]]] = True
    via_dense = full_ranking_metrics(scores, dense, truth, ks)
    via_dense_chunked = full_ranking_metrics(scores, dense, truth, ks, chunk_size=33)
    via_kw_chunked = full_ranking_metrics(scores, None, truth, ks, mask_indptr=indptr_t, mask_indices=indices_t,
                                          chunk_size=10)
    parts = []
    for start in range(0, b, 50):
        rows = torch.arange(start, min(start + 50, b))
        sub_ptr, sub_idx = select_csr_rows(indptr_t, indices_t, rows)
        parts.append(full_ranking_metrics(scores[rows], (sub_ptr, sub_idx), truth[rows], ks))
    for key in full:
        caller = torch.cat([p[key] for p in parts])
        for other in (via_dense[key], via_dense_chunked[key], via_kw_chunked[key], caller):
            assert torch.equal(full[key].nan_to_num(-1.0), other.nan_to_num(-1.0)), key


def test_select_csr_rows() -> None:
    indptr, indices = T([0, 2, 2, 5]), T([1, 3, 0, 2, 4])
    p, ix = select_csr_rows(indptr, indices, T([2, 0, 1, 2]))
    assert p.tolist() == [0, 3, 5, 5, 8]
    assert ix.tolist() == [0, 2, 4, 1, 3, 0, 2, 4]
    p, ix = select_csr_rows(indptr, indices, T([], dtype=torch.int64))
    assert p.tolist() == [0] and ix.tolist() == []


def test_masked_topk() -> None:
    scores = T([[0.1, 0.9, 0.5, float("nan"), 0.7]])
    vals, idx = masked_topk(scores, (T([0, 1]), T([1])), 3)
    assert idx.tolist() == [[4, 2, 0]]
    assert approx(vals, [[0.7, 0.5, 0.1]])
    vals, idx = masked_topk(scores, T([[False, True, False, False, False]]), 5)
    assert torch.equal(idx, masked_topk(scores, None, 5, mask_indptr=T([0, 1]), mask_indices=T([1]))[1])
    assert idx[0, :3].tolist() == [4, 2, 0]
    assert torch.isneginf(vals[0, 3:]).all()
    with pytest.raises(ValueError):
        masked_topk(scores, None, 6)


def test_chunk_size_for() -> None:
    # 1 MiB / (1024 items * 4 B * 4) = 64 rows
    assert chunk_size_for(1024, 1) == 64
    assert chunk_size_for(1024, 1, bytes_per_score=2, overhead=1) == 512
    assert chunk_size_for(10**9, 1) == 1  # never below 1
    with pytest.raises(ValueError):
        chunk_size_for(0, 1)
    with pytest.raises(ValueError):
        chunk_size_for(10, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    scores, truth, mask = _random_full_case(3, b=64, i=500, h_max=5)
    ks = [1, 10, 100]
    cpu = full_ranking_metrics(scores, mask, truth, ks)
    gpu = full_ranking_metrics(scores.cuda(), mask.cuda(), truth, ks, chunk_size=17)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    csr = (indptr.cuda(), mask.nonzero()[:, 1].cuda())
    gpu_csr = full_ranking_metrics(scores.cuda(), csr, truth.cuda(), ks)
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        assert torch.equal(cpu[key], gpu[key].cpu()), key
        assert torch.equal(cpu[key], gpu_csr[key].cpu()), key
    ranks = sampled_ranks(scores[:, 0].cuda(), scores[:, 1:101].cuda())
    assert torch.equal(ranks.cpu(), sampled_ranks(scores[:, 0], scores[:, 1:101]))
    _, idx = masked_topk(scores.cuda(), mask.cuda(), 5)
    assert torch.equal(idx.cpu(), masked_topk(scores, mask, 5)[1])


def _brute_full(scores, mask, truth, ks):
    """Reference: pessimistic positions by explicit ordering of every row (Python loops)."""
    import math

    out = {f"{m}@{k}": [] for k in ks for m in ("Recall", "NDCG", "HR")}
    for b in range(scores.shape[0]):
        gt = [int(t) for t in truth[b] if t >= 0]
        if not gt:
            for key in out:
                out[key].append(float("nan"))
            continue
        s = [(-math.inf if math.isnan(x) else x) if j in gt else (math.inf if math.isnan(x) else x)
             for j, x in enumerate(scores[b].tolist())]
        cands = [j for j in range(len(s)) if not mask[b, j] and j not in gt]
        # held-out h: after every candidate with score >= s_h and every held-out ranked before it
        pos = {}
        for c, h in enumerate(gt):
            above = sum(1 for j in cands if s[j] >= s[h])
            before = sum(1 for c2, h2 in enumerate(gt) if s[h2] > s[h] or (s[h2] == s[h] and c2 < c))
            pos[h] = 1 + above + before
        for k in ks:
            hits = [p for p in pos.values() if p <= k]
            idcg = sum(1 / math.log2(i + 1) for i in range(1, min(len(gt), k) + 1))
            out[f"Recall@{k}"].append(len(hits) / len(gt))
            out[f"NDCG@{k}"].append(sum(1 / math.log2(p + 1) for p in hits) / idcg)
            out[f"HR@{k}"].append(float(bool(hits)))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("H", [1, 2, 5])  # 1-2 held-out columns: counted positions; more: one top-k per chunk
@pytest.mark.parametrize("csr", [False, True])
def test_full_ranking_matches_brute_force_with_ties_nans_and_short_rows(seed, H, csr):
    from rayrec.eval import metrics

    assert (H <= metrics.COUNT_MAX_HELDOUT) == (H < 5)  # both paths are exercised
    g = torch.Generator().manual_seed(seed)
    B, I = 12, 15
    scores = torch.randint(0, 4, (B, I), generator=g).double()  # many ties
    scores[torch.rand(B, I, generator=g) < 0.05] = float("nan")
    scores[torch.rand(B, I, generator=g) < 0.05] = float("inf")
    scores[torch.rand(B, I, generator=g) < 0.05] = -float("inf")
    scores[0] = 1.0  # a constant row
    truth = torch.full((B, H), -1)
    mask = torch.zeros(B, I, dtype=torch.bool)
    for b in range(B):
        perm = torch.randperm(I, generator=g)
        n_gt = int(torch.randint(0, H + 1, (1,), generator=g))
        truth[b, :n_gt] = perm[:n_gt]
        n_mask = 12 if b % 3 == 0 else int(torch.randint(0, 6, (1,), generator=g))  # some rows: < kmax candidates
        mask[b, perm[H : H + n_mask]] = True
    ks = [1, 3, 5, 10]
    want = _brute_full(scores, mask, truth, ks)
    if csr:  # the same mask as (indptr, indices) with every entry listed twice (duplicates are allowed)
        rows, cols = mask.nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, rows]), torch.cat([cols, cols])
        order = torch.argsort(rows, stable=True)
        mask = (torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(rows, minlength=B).cumsum(0)]),
                cols[order])
    got = full_ranking_metrics(scores, mask, truth, ks)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], equal_nan=True, msg=k)


def test_counted_positions_equal_the_top_k_path_over_a_wide_catalogue(monkeypatch):
    """More items than one int16 count block (32767): the counted positions span blocks and agree with the top-k
    path on every metric."""
    from rayrec.eval import metrics

    g = torch.Generator().manual_seed(0)
    B, I = 6, 70_000
    scores = torch.randint(0, 10_000, (B, I), generator=g).float()  # ~7 items per score: ties across blocks
    truth = torch.stack([torch.randperm(I, generator=g)[:2] for _ in range(B)])
    truth[0, 1] = -1
    scores[torch.arange(B), truth[:, 0]] = torch.tensor([9_999.0, 9_990.0, 9_900.0, 9_000.0, 5_000.0, 0.0])
    mask = torch.rand(B, I, generator=g) < 0.3
    mask[torch.arange(B).unsqueeze(1), truth.clamp(min=0)] = False
    ks = [1, 10, 100, 1000]
    counted = full_ranking_metrics(scores, mask, truth, ks)
    monkeypatch.setattr(metrics, "COUNT_MAX_HELDOUT", 0)
    top_k = full_ranking_metrics(scores, mask, truth, ks)
    assert 0 < float(counted["Recall@1000"].mean()) < 1
    for k in top_k:
        torch.testing.assert_close(counted[k], top_k[k], equal_nan=True, msg=k)


@pytest.mark.parametrize("block", [1, 4, 12])
def test_heldout_ranker_blocks_with_csr_truth_match_brute_force(block):
    """Ranked block by block against exclusions and held-out items checked once (as evaluate() does), with the
    held-out items as a CSR: blocks of different widths (one row holds 6 held-out items, so only its block takes the
    top-k path), the same metrics as the brute force over the whole matrix."""
    from rayrec.eval.metrics import HeldoutRanker, full_metrics_from_positions

    g = torch.Generator().manual_seed(7)
    B, I = 12, 15
    scores = torch.randint(0, 4, (B, I), generator=g).double()  # many ties
    scores[torch.rand(B, I, generator=g) < 0.05] = float("nan")
    truth = torch.full((B, 6), -1)
    mask = torch.zeros(B, I, dtype=torch.bool)
    for b in range(B):
        perm = torch.randperm(I, generator=g)
        n_gt = 6 if b == 5 else int(torch.randint(0, 3, (1,), generator=g))
        truth[b, :n_gt] = perm[:n_gt]
        mask[b, perm[6 : 6 + int(torch.randint(0, 6, (1,), generator=g))]] = True
    scores[mask] = 9.0  # an exclusion left in would rank above every held-out item
    ks = [1, 3, 10]
    want = _brute_full(scores, mask, truth, ks)
    valid = truth >= 0
    t_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), valid.sum(1).cumsum(0)])
    ranker = HeldoutRanker(I, (t_ptr, truth[valid]), mask)
    got, widths = {k: [] for k in want}, set()
    for start in range(0, B, block):
        pos, v = ranker.positions(scores[start : start + block], start, max(ks))
        widths.add(pos.shape[1])
        for k, x in full_metrics_from_positions(pos, v, ks).items():
            got[k].append(x)
    assert (6 in widths) and (block == B or len(widths) > 1)
    for k in want:
        torch.testing.assert_close(torch.cat(got[k]).double(), want[k], equal_nan=True, msg=k)
    with pytest.raises(ValueError, match="lists a held-out item twice"):
        HeldoutRanker(I, (T([0, 2, 2]), T([3, 3])), None)
    with pytest.raises(ValueError, match="held-out item 3 of row 1 is masked out"):
        HeldoutRanker(I, (T([0, 0, 1]), T([3])), (T([0, 1, 3]), T([3, 0, 3])))
    with pytest.raises(ValueError, match="does not fit"):
        ranker.positions(scores[:3], B - 2, 10)


@pytest.mark.parametrize("block", [7, 40])
def test_fused_dot_positions_equal_the_score_block_positions(native_kernels, block):
    """HeldoutRanker.positions_dot (scores never written: dot_count, dot_pairs) against positions() of the score
    block, on small integer embeddings whose dot products are exact in float (so both paths see the same scores,
    with many ties), NaN scores from a NaN user row and a NaN item, exclusions, 0-2 held-out items per row, one row
    with 6 (its block falls back to the score block), and a tile's masked tail (150 items = 2 x 64 + 22)."""
    from rayrec.eval.metrics import HeldoutRanker

    g = torch.Generator().manual_seed(11)
    B, I, D = 40, 150, 3
    Q = torch.randint(-2, 3, (B, D), generator=g).float()
    V = torch.randint(-2, 3, (I, D), generator=g).float()
    Q[3, 1], V[17, 0] = float("nan"), float("nan")
    truth = torch.full((B, 6), -1)
    mask = torch.zeros(B, I, dtype=torch.bool)
    for b in range(B):
        perm = torch.randperm(I, generator=g)
        n_gt = 6 if b == 30 else int(torch.randint(0, 3, (1,), generator=g))
        truth[b, :n_gt] = perm[:n_gt]
        mask[b, perm[6 : 6 + int(torch.randint(0, 40, (1,), generator=g))]] = True
    ranker = HeldoutRanker(I, truth, mask)
    scores = Q @ V.T
    for start in range(0, B, block):
        q = Q[start : start + block]
        got, got_valid = ranker.positions_dot(q, V, V.T.contiguous(), start, 20)
        want, want_valid = ranker.positions(scores[start : start + block], start, 20)
        assert torch.equal(got_valid, want_valid)
        assert torch.equal(torch.where(got_valid, got, 0), torch.where(want_valid, want, 0))
    assert int((ranker.positions_dot(Q, V, V.T.contiguous(), 0, 20)[0] <= 20).sum()) > 10  # hits, not all missed


def test_dot_count_and_dot_pairs_against_torch(native_kernels):
    g = torch.Generator().manual_seed(5)
    B, I, D = 13, 1000, 20  # users not a multiple of the 6-user tile, items not of the 64-item one
    Q = torch.randint(-3, 4, (B, D), generator=g).float()
    V = torch.randint(-3, 4, (I, D), generator=g).float()
    scores = Q @ V.T  # exact: small integers
    th = scores.gather(1, torch.randint(0, I, (B, 2), generator=g))  # thresholds tied with real scores
    th[0, 1] = float("-inf")
    want = torch.stack([(~(scores < th[:, h : h + 1])).sum(1) for h in range(2)], dim=1)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            assert torch.equal(native_kernels.dot_count(Q, V.T.contiguous(), th), want)
        finally:
            torch.set_num_threads(1)
    assert int(want[0, 1]) == I
    rows, cols = torch.randint(0, B, (500,), generator=g), torch.randint(0, I, (500,), generator=g)
    assert torch.equal(native_kernels.dot_pairs(Q, V, rows, cols), scores[rows, cols])
    with pytest.raises(RuntimeError, match="out of range"):
        native_kernels.dot_pairs(Q, V, rows, cols + I)
    with pytest.raises(RuntimeError, match="th \\[B, H\\]"):
        native_kernels.dot_count(Q, V.T.contiguous(), th[:5])


def test_fused_dot_positions_of_real_valued_embeddings(native_kernels):
    """Random float embeddings (dot products rounded, no ties): the held-out items' own scores (dot_pairs) must be
    the very sums the count compares (dot_count), or each position would be off by one. Against float64 scores."""
    from rayrec.eval.metrics import HeldoutRanker

    g = torch.Generator().manual_seed(3)
    B, I, D = 50, 700, 20
    Q, V = torch.randn(B, D, generator=g), torch.randn(I, D, generator=g)
    truth = torch.stack([torch.randperm(I, generator=g)[:1] for _ in range(B)])
    mask = torch.rand(B, I, generator=g) < 0.1
    mask[torch.arange(B), truth[:, 0]] = False
    ranker = HeldoutRanker(I, truth, mask)
    got, _ = ranker.positions_dot(Q, V, V.T.contiguous(), 0, I)
    want, _ = ranker.positions((Q.double() @ V.T.double()), 0, I)
    assert torch.equal(got, want) and len(set(got.flatten().tolist())) > 20
