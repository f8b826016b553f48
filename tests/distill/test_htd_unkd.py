"""HTD/FTD and UnKD on hand-computable tensors: topology values, group splits, pair sampling, gradients, configs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayrec.distill.base import DistillBatch, TeacherAnswer
from rayrec.distill.htd import HTD, HTDConfig, entity_topology_terms, full_topology_terms, group_topology_terms
from rayrec.distill.unkd import UnKD, UnKDConfig, pairs_per_group, popularity_groups, truncated_geometric
from rayrec.errors import ConfigError
from rayrec.models import BPR, NeuMF


def _batch():
    return DistillBatch(torch.tensor([0, 1, 1, 3]), torch.tensor([2, 3, 4, 2]), torch.tensor([[5], [6], [5], [7]]))


def _answer(teacher, req):
    return TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))


# ------------------------------------------------------------------------------------------------------ HTD / FTD
def test_full_topology_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # cos_t: (1,2)=0, (1,3)=(2,3)=1/√2; cos_s: (1,2)=(2,3)=1/√2, (1,3)=0
    # -> (1,2) and (1,3) differ by 1/√2, counted in both orders: 4 · ½
    terms = full_topology_terms(s, t)
    assert terms.shape == (9,) and terms.sum().item() == pytest.approx(4 * 0.5, abs=1e-6)
    # entity level with one group == FTD; with the code's "positive" rule the (1,2) pair (teacher cos 0) is dropped
    z = torch.zeros(3, dtype=torch.int64)
    assert entity_topology_terms(s, t, z, "all").sum().item() == pytest.approx(2.0, abs=1e-6)
    assert entity_topology_terms(s, t, z, "positive").sum().item() == pytest.approx(1.0, abs=1e-6)
    # two groups {1, 3}, {2}: only the pair (1, 3) remains, both orders
    assert entity_topology_terms(s, t, torch.tensor([0, 1, 0]), "all").sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("entity_pairs", ["positive", "all"])
def test_entity_topology_per_group_blocks_equal_the_masked_full_matrix(entity_pairs):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, 3, generator=g, requires_grad=True), torch.randn(40, 6, generator=g)
    z = torch.randint(0, 5, (40,), generator=g) * 3  # 5 of 15 ids used, unequal sizes, unsorted
    z[:12] = 6  # one large group
    # the reference: the code's whole [n, n] matrices, masked
    a_s, a_t = F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).T, F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).T
    keep = (z[:, None] == z[None, :]) & ((a_t > 0) if entity_pairs == "positive" else True)
    want = (a_s[keep] - a_t[keep]).pow(2)
    got = entity_topology_terms(s, t, z, entity_pairs)
    assert got.shape == want.shape and torch.allclose(got.sort().values, want.sort().values, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    assert torch.allclose(g_got, g_want, atol=1e-5)


def test_group_topology_prototypes_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    z = torch.tensor([4, 4, 1])  # groups present: 1 = {3}, 4 = {1, 2}
    got = group_topology_terms(s, t, z, n_groups=6, choice="second")
    p_t = torch.stack([t[2], (t[0] + t[1]) / 2])  # sorted group ids: 1, 4
    p_s = torch.stack([s[2], (s[0] + s[1]) / 2])
    want = [(F.cosine_similarity(p_s[k], s[e], 0) - F.cosine_similarity(p_t[k], t[e], 0)) ** 2
            for k in range(2) for e in range(3)]
    assert got.shape == (6,) and torch.allclose(got, torch.stack(want), atol=1e-6)
    first = group_topology_terms(s.requires_grad_(), t, z, n_groups=6, choice="first")
    assert first.shape == (4,) and not first.requires_grad  # (P, P) with detached prototypes: a constant (code)
    assert group_topology_terms(s, t, z, 6, "first", prototype_grad=True).requires_grad


def _models(U=5, I=9, d_s=4, d_t=4):
    return BPR(U, I, d_s, init_std=0.5), BPR(U, I, d_t, init_std=0.5)


def test_topology_loss_is_zero_when_student_and_teacher_similarities_match():
    student, teacher = _models()
    Q, _ = torch.linalg.qr(torch.randn(4, 4))  # rotation: cosines unchanged; a global scale keeps prototypes too
    with torch.no_grad():
        student.user_emb.weight.copy_(3.0 * teacher.user_emb.weight @ Q)
        student.item_emb.weight.copy_(3.0 * teacher.item_emb.weight @ Q)
    b = _batch()
    for cfg in (HTDConfig(mode="ftd"), HTDConfig(alpha=1.0, M=3), HTDConfig(alpha=1.0, M=3, choice="first",
                                                                            entity_pairs="all")):
        m = HTD(cfg, student_dim=4, teacher_dim=4, parts=["emb"])
        ans = _answer(teacher, m.teacher_request(b))
        assert abs(m.losses(batch=b, student=student, teacher=ans)[f"kd/{cfg.mode}"].item()) < 1e-8
    with torch.no_grad():
        student.item_emb.weight[5] += torch.tensor([1.0, -2.0, 0.5, 0.0])  # one negative item moves
    m = HTD(HTDConfig(mode="ftd"), student_dim=4, teacher_dim=4, parts=["emb"])
    assert m.losses(batch=b, student=student, teacher=_answer(teacher, m.teacher_request(b)))["kd/ftd"].item() > 1e-3


def test_htd_by_hand_with_fixed_groups_and_alpha_mixing():
    student, teacher = _models(d_s=3, d_t=5)
    M = 2
    m = HTD(HTDConfig(M=M, alpha=0.7, lambda_htd=0.5), student_dim=3, teacher_dim=5, parts=["emb"])
    with torch.no_grad():  # every user in group 0, every item in group M + 1
        for side, bias in ((m.users["emb"], [1.0, 0.0]), (m.items["emb"], [0.0, 1.0])):
            side.select.weight.zero_()
            side.select.bias.copy_(torch.tensor(bias))
    m.on_epoch_start(0, torch.Generator().manual_seed(0))
    b = _batch()
    req = m.teacher_request(b)
    assert torch.equal(req.items, torch.tensor([2, 3, 4, 5, 6, 7]))  # unique(pos ∪ neg)
    ans = _answer(teacher, req)
    users, items = b.uniq_users, req.items
    su, si = student.user_emb(users).detach(), student.item_emb(items).detach()
    tu, ti = teacher.user_emb(users).detach(), teacher.item_emb(items).detach()
    cos = lambda a, b_: F.cosine_similarity(a, b_, dim=0).item()  # noqa: E731
    entity = sum((cos(x[i], x[j]) - cos(y[i], y[j])) ** 2
                 for x, y in ((su, tu), (si, ti)) for i in range(len(x)) for j in range(len(x)) if cos(y[i], y[j]) > 0)
    s_all, t_all = torch.cat([su, si]), torch.cat([tu, ti])
    protos = [(su.mean(0), tu.mean(0)), (si.mean(0), ti.mean(0))]
    group = sum((cos(ps, s_all[e]) - cos(pt, t_all[e])) ** 2 for ps, pt in protos for e in range(len(s_all)))

    def run(alpha):
        m.cfg.alpha = alpha
        m.generator = torch.Generator().manual_seed(7)  # the same Gumbel draws for the GA part
        return m.losses(batch=b, student=student, teacher=ans)["kd/htd"].item()

    assert run(1.0) == pytest.approx(0.5 * (entity + group), rel=1e-5)
    g = torch.Generator().manual_seed(7)
    ga = m.users["emb"](su, tu, m.tau, g).sum() + m.items["emb"](si, ti, m.tau, g).sum()  # weight 1 on items
    assert run(0.0) == pytest.approx(0.5 * ga.item(), rel=1e-5)
    assert run(0.3) == pytest.approx(0.3 * run(1.0) + 0.7 * run(0.0), rel=1e-5)
    m.cfg.alpha = 1.0
    mean = m.losses(batch=b, student=student, teacher=ans, reduction="mean")["kd/htd"].item()
    n_pairs = sum(1 for y in (tu, ti) for i in range(len(y)) for j in range(len(y)) if cos(y[i], y[j]) > 0)
    assert mean == pytest.approx(0.5 * (entity / n_pairs + group / (2 * len(s_all))), rel=1e-5)


def test_htd_gradients_reach_student_experts_and_selection_but_not_the_teacher():
    student, teacher = _models(d_s=4, d_t=8)
    m = HTD(HTDConfig(M=3), student_dim=4, teacher_dim=8, parts=["emb"])
    m.on_epoch_start(0, torch.Generator().manual_seed(0))  # tau = 1: the selection network learns
    b = _batch()
    ans = _answer(teacher, m.teacher_request(b))  # with grad on purpose
    terms = m.losses(batch=b, student=student, teacher=ans)
    assert set(terms) == {"kd/htd"} and m.epoch_metrics() == {"kd/tau": 1.0}
    terms["kd/htd"].backward()
    for side in (m.users["emb"], m.items["emb"]):
        assert side.w1.grad.abs().sum() > 0 and side.w2.grad.abs().sum() > 0
        assert side.select.weight.grad.abs().sum() > 0
    assert student.user_emb.weight.grad.abs().sum() > 0 and student.item_emb.weight.grad.abs().sum() > 0
    assert teacher.user_emb.weight.grad is None and teacher.item_emb.weight.grad is None
    # topology alone (alpha = 1) also trains the student
    student.zero_grad()
    m.cfg.alpha = 1.0
    m.losses(batch=b, student=student, teacher=ans)["kd/htd"].backward()
    assert student.user_emb.weight.grad.abs().sum() > 0


def test_ftd_has_no_parameters_and_neumf_parts_are_distilled_separately():
    ftd = HTD(HTDConfig(mode="ftd"), student_dim=4, teacher_dim=8, parts=["emb"])
    assert sum(p.numel() for p in ftd.parameters()) == 0 and ftd.epoch_metrics() == {}
    student, teacher = NeuMF(5, 9, 4), NeuMF(5, 9, 8)
    m = HTD(HTDConfig(M=2), student_dim=4, teacher_dim=8, parts=["gmf", "mlp"])
    b = _batch()
    with torch.no_grad():
        ans = _answer(teacher, m.teacher_request(b))
    m.losses(batch=b, student=student, teacher=ans)["kd/htd"].backward()
    assert all(m.users[p].w1.grad is not None for p in ("gmf", "mlp"))
    assert student.gmf_user.weight.grad.abs().sum() > 0 and student.mlp_item.weight.grad.abs().sum() > 0
    assert HTD(HTDConfig(lambda_htd=0), student_dim=4, teacher_dim=8, parts=["emb"]).losses(
        batch=b, student=student, teacher=ans) == {}
    frozen = HTD(HTDConfig(alpha=1.0), student_dim=4, teacher_dim=8, parts=["emb"])  # no L_GA: nothing to train
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("kw", [dict(alpha=1.5), dict(alpha=-0.1), dict(M=0), dict(lambda_htd=-1.0),
                                dict(mode="full"), dict(choice="third"), dict(tau_end=2.0), dict(hidden=-1),
                                dict(skip_below=1.0)])
def test_htd_config_validation(kw):
    with pytest.raises(ConfigError):
        HTDConfig(**kw)


# ------------------------------------------------------------------------------------------------------------ UnKD
def test_popularity_groups_and_pair_shares_by_hand():
    counts = np.array([10, 5, 3, 1, 1, 0])
    # mass: share 20 / 2 = 10; item 0 fills group 0 exactly, item 1 would push it over -> starts group 1
    assert popularity_groups(counts, 2, "mass").tolist() == [0, 1, 1, 1, 1, -1]
    assert popularity_groups(counts, 2, "size").tolist() == [0, 0, 0, 1, 1, -1]
    assert popularity_groups(np.array([1, 30, 2, 2]), 2, "mass").tolist() == [1, 0, 1, 1]  # a heavy item alone
    group = popularity_groups(counts, 2, "mass")
    # mean counts 10 and 2.5 -> inverse weights (12.5 - 10, 12.5 - 2.5) / 12.5 = (0.2, 0.8)
    assert pairs_per_group(counts, group, 2, 5, gamma=1.0) == [1, 4]
    assert pairs_per_group(counts, group, 2, 2, gamma=0.0) == [1, 1]  # KDs CiteULike: equal shares
    assert pairs_per_group(counts, group, 2, 1, gamma=0.0) == [1, 0]  # round(0.5) = 0, the first group tops up


def test_truncated_geometric_ranks():
    g = torch.Generator().manual_seed(0)
    r = truncated_geometric(torch.full((20000,), 5), 2, mu=2.0, generator=g)
    assert r.min() >= 0 and r.max() <= 4
    freq = torch.bincount(r.flatten(), minlength=5).double()
    want = torch.exp(-torch.arange(5) / 2.0).double()
    assert torch.allclose(freq / freq.sum(), want / want.sum(), atol=0.01)
    assert (truncated_geometric(torch.tensor([1, 3]), 50, 20.0, g)[0] == 0).all()


def _unkd_setup(N=10, n_distill=6, groups=2, **kw):
    """8 users x 60 items: six users with popularity-skewed train items, two that cover every item once (so every
    item is in a group); the teacher's scores are random, its lists the top-N non-train items."""
    rng = np.random.default_rng(0)
    U, I = 8, 60
    p = np.linspace(3, 0.1, I) / np.linspace(3, 0.1, I).sum()
    train = [sorted(rng.choice(I, size=6, replace=False, p=p).tolist()) for _ in range(6)]
    train += [list(range(0, I, 2)), list(range(1, I, 2))]
    indptr = np.cumsum([0] + [len(t) for t in train])
    scores = torch.randn(U, I)  # the teacher's scores
    masked = scores.clone()
    for u, t in enumerate(train):
        masked[u, t] = -1e9
    topn = torch.topk(masked, N, dim=1).indices.numpy()  # best first, train excluded
    cfg = UnKDConfig(groups=groups, n_distill=n_distill, **kw)
    m = UnKD(cfg, topn=topn, train_indptr=indptr, train_indices=np.concatenate(train), num_items=I)
    return m, scores, train, topn


def test_unkd_pairs_stay_in_one_group_and_follow_the_teacher_order():
    m, scores, train, topn = _unkd_setup(N=10, mu=2.0)
    assert m.n_g == [3, 3] and m.pos.shape == (8, 6) and (m.item_group >= 0).all()
    m.on_epoch_start(0, torch.Generator().manual_seed(0))
    grp = m.item_group
    assert m.valid.float().mean() > 0.6 and m.unlisted.any()  # a short list: some negatives come from below it
    for u in range(8):
        for c in range(6):
            if not m.valid[u, c]:
                continue
            i, j = int(m.pos[u, c]), int(m.neg[u, c])
            assert grp[i] == grp[j] == c // 3  # columns 0-2: group 0, 3-5: group 1
            assert scores[u, i] > scores[u, j] and i not in train[u] and j not in train[u]
            assert i in topn[u]  # the positive always comes from the list
            assert (j not in topn[u]) == bool(m.unlisted[u, c])
    before = m.pos.clone()
    m.on_epoch_start(1, torch.Generator().manual_seed(1))
    assert not torch.equal(before, m.pos)  # resampled every epoch
    # a full ranking: every pair is listed and valid
    full, scores, train, topn = _unkd_setup(N=30)  # the users with 30 train items: every other item listed
    full.on_epoch_start(0, torch.Generator().manual_seed(0))
    assert full.valid[6:].all() and not full.unlisted[6:].any()
    for u in range(8):
        keep = full.valid[u]
        assert (scores[u, full.pos[u][keep]] > scores[u, full.neg[u][keep]]).all()


def test_unkd_switches_between_train_and_eval_like_any_module():
    m, *_ = _unkd_setup()
    m.eval()
    assert not m.training
    m.train()
    assert m.training


def test_unkd_ignores_train_items_left_in_the_lists():
    m, scores, train, topn = _unkd_setup(N=8)
    topn = topn.copy()
    topn[:, 0] = [t[0] for t in train]  # rank_teacher with exclude=none: a train item at the top
    indptr = np.cumsum([0] + [len(t) for t in train])
    m = UnKD(UnKDConfig(n_distill=6), topn=topn, train_indptr=indptr, train_indices=np.concatenate(train),
             num_items=60)
    assert (m.topn_group[:, 0] == -1).all()
    m.on_epoch_start(0, torch.Generator().manual_seed(0))
    assert m.valid.any()
    for u in range(8):
        assert not set(m.pos[u][m.valid[u]].tolist()) & set(train[u])
        assert not set(m.neg[u][m.valid[u]].tolist()) & set(train[u])


def test_unkd_loss_by_hand_and_gradients():
    m, *_ = _unkd_setup(N=10, lambda_unkd=0.5)
    m.on_epoch_start(0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.valid[1, 0] = False  # one dropped pair: the user's mean runs over the other five
    student = BPR(8, 60, 3, init_std=0.5)
    b = _batch()  # rows: users 0, 1, 1, 3
    got = m.losses(batch=b, student=student, teacher=None)["kd/unkd"]
    want = 0.0
    for u in b.users.tolist():
        keep = m.valid[u]
        s_pos = student.score(torch.tensor([u]), m.pos[u][keep].view(1, -1))
        s_neg = student.score(torch.tensor([u]), m.neg[u][keep].view(1, -1))
        want = want + (-torch.log(torch.sigmoid(s_pos - s_neg))).mean()
    assert got.item() == pytest.approx(0.5 * want.item(), rel=1e-5)
    got.backward()
    assert student.user_emb.weight.grad[[0, 1, 3]].abs().sum() > 0 and student.user_emb.weight.grad[2].abs().sum() == 0
    assert student.item_emb.weight.grad.abs().sum() > 0
    assert not m.needs_teacher and m.needs_ranking and m.teacher_request(b) is None
    assert sum(p.numel() for p in m.parameters()) == 0
    row1 = m.losses(batch=DistillBatch(torch.tensor([1]), torch.tensor([2]), torch.tensor([[5]])), student=student,
                    teacher=None)["kd/unkd"]
    m.cfg.per = "user"  # the same pairs, summed over unique users (user 1 once)
    assert m.losses(batch=b, student=student, teacher=None)["kd/unkd"].item() == pytest.approx(
        got.item() - row1.item(), rel=1e-5)
    metrics = m.epoch_metrics()
    assert 0 < metrics["kd/unkd_valid"] <= 1 and 0 <= metrics["kd/unkd_unlisted"] <= 1


@pytest.mark.parametrize("kw", [dict(groups=0), dict(groups=200), dict(n_distill=0), dict(mu=0.0),
                                dict(max_rank=1), dict(lambda_unkd=-0.5), dict(gamma=-1.0), dict(split="pop"),
                                dict(per="batch")])
def test_unkd_config_validation(kw):
    with pytest.raises(ConfigError):
        UnKDConfig(**kw)


def test_unkd_rejects_a_train_csr_of_other_users():
    with pytest.raises(ConfigError, match="users"):
        UnKD(UnKDConfig(), topn=np.zeros((3, 2), dtype=np.int64), train_indptr=np.array([0, 1]),
             train_indices=np.array([0]), num_items=5)


def test_unkd_sampling_is_vectorised_over_many_users():
    U, I, N = 2000, 400, 200
    g = torch.Generator().manual_seed(0)
    indptr = np.arange(0, 5 * U + 1, 5)
    indices = torch.randint(0, I // 2, (5 * U,), generator=g).numpy()  # popular items: the first half
    topn = torch.argsort(torch.rand(U, I, generator=g), dim=1)[:, :N].numpy()
    train = set(zip(np.repeat(np.arange(U), 5).tolist(), indices.tolist()))
    m = UnKD(UnKDConfig(n_distill=4, groups=3), topn=topn, train_indptr=indptr, train_indices=indices,
             num_items=I, chunk=1024)
    m.on_epoch_start(0, g)
    assert m.pos.shape == (U, sum(m.n_g)) and m.valid.float().mean() > 0.9
    same = m.item_group[m.pos] == m.item_group[m.neg]
    assert same[m.valid].all()
    u, c = torch.nonzero(m.valid, as_tuple=True)
    assert not any((a, b) in train for a, b in zip(u[:2000].tolist(), m.neg[u[:2000], c[:2000]].tolist()))
    assert math.isfinite(m.epoch_metrics()["kd/unkd_valid"])
