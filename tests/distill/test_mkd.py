"""MKD's parts (CPD, SLD) and their combination on tiny tensors: the spec's pitfalls (mkd.md §10) as tests."""

import numpy as np
import pytest
import torch

from rayrec.distill.base import DistillBatch, TeacherAnswer
from rayrec.distill.cpd import CPD, CPDConfig, list_regularizer, pair_regularizer
from rayrec.distill.mkd import MKD, MKDConfig
from rayrec.distill.nkd import NKD, NKDConfig
from rayrec.distill.sld import SLD, SLDConfig, soft_label_ce
from rayrec.errors import ConfigError
from rayrec.models import BPR, LightGCN

U, I = 6, 30


def _batch():
    return DistillBatch(torch.tensor([0, 1, 1, 3, 5]), torch.tensor([2, 3, 4, 2, 9]),
                        torch.tensor([[5, 8], [6, 7], [5, 11], [7, 12], [13, 1]]))


def _teacher_lists(seed=0, N=25):
    g = np.random.default_rng(seed)
    return np.stack([g.permutation(I)[:N] for _ in range(U)])  # [U, N]


def _answer(teacher, req):
    with torch.no_grad():
        return TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))


def _score_epoch_lists(method, teacher):
    """What the loop does at each epoch start for methods with fixed lists (SLD): the teacher scores them once."""
    lists = method.epoch_teacher_lists()
    with torch.no_grad():
        method.set_teacher_scores(teacher.score(torch.arange(lists.shape[0]), lists))


@pytest.mark.parametrize("form,reg,pair_sample", [("v1", "both", "batch"), ("v1", "pair", "uniform"),
                                                  ("pckd", "list", "batch"), ("pckd", "hybrid", "batch"),
                                                  ("pckd", "pair", "rank")])
def test_cpd_regularisers_train_only_the_projector(form, reg, pair_sample):
    torch.manual_seed(0)
    student, teacher = BPR(U, I, 4, init_std=0.5), BPR(U, I, 8, init_std=0.5)
    for p in teacher.parameters():
        p.requires_grad_(True)  # a teacher that *could* receive gradients must not get any
    cfg = CPDConfig(form=form, regularizer=reg, pair_sample=pair_sample, Q=5, mxK=20, experts=3, alpha=0.5,
                    beta=0.7, pair_loss="logsigmoid" if form == "pckd" else "hinge")
    cpd = CPD(cfg, student_dim=4, teacher_dim=8, num_items=I, topn=_teacher_lists())
    cpd.on_epoch_start(0, torch.Generator().manual_seed(1))
    if cfg.needs_lists:
        assert cpd.q_lists.shape == (U, 5)
        lists = _teacher_lists()
        for u in range(U):  # Q_u: items of the teacher's list, kept in the teacher's order
            pos = [list(lists[u]).index(int(i)) for i in cpd.q_lists[u]]
            assert pos == sorted(pos) and len(set(pos)) == 5
    else:
        assert cpd.q_lists is None  # uniform pairs need no lists
    b = _batch()
    ans = _answer(teacher, cpd.teacher_request(b))
    terms = cpd.losses(batch=b, student=student, teacher=ans)
    regs = [k for k in terms if k != "kd/cpd_fd"]
    assert regs and all(torch.isfinite(v) for v in terms.values())
    sum(terms[k] for k in regs).backward()
    assert student.user_emb.weight.grad is None and student.item_emb.weight.grad is None  # student: nothing
    proj = [p.grad for p in (*cpd.user_proj.parameters(), *cpd.item_proj.parameters()) if p.grad is not None]
    assert proj and sum(float(g.abs().sum()) for g in proj) > 0  # the projectors learn from them
    assert all(p.grad is None for p in teacher.parameters())
    # the feature term reaches the student and the projectors, never the teacher
    terms["kd/cpd_fd"].backward()
    assert student.user_emb.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    m = cpd.epoch_metrics()
    assert 0 <= m["kd/cpd_incon"] <= 1


def test_pair_and_list_regularisers_by_hand():
    d_hat, d = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 1.0, -1.0])
    assert pair_regularizer(d_hat, d, "hinge").tolist() == pytest.approx([0.0, 2.0, 0.5])
    assert pair_regularizer(d_hat, d, "logsigmoid").tolist() == pytest.approx(
        [-np.log(1 / (1 + np.exp(-2.0))), -np.log(1 / (1 + np.exp(2.0))), -np.log(1 / (1 + np.exp(0.5)))], rel=1e-5)
    r = torch.tensor([[1.0, 0.0]])
    p = torch.softmax(r / 0.5, -1)
    want = -(p * torch.log_softmax(torch.tensor([[0.0, 1.0]]) / 0.5, -1)).sum()
    assert list_regularizer(torch.tensor([[0.0, 1.0]]), r, 0.5).item() == pytest.approx(want.item(), rel=1e-6)
    # the list term is minimal (= the entropy of the target) when r̂ ranks like r
    same = list_regularizer(r.clone(), r, 0.5)
    assert same.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_cpd_config_errors():
    with pytest.raises(ConfigError, match="hybrid"):
        CPDConfig(form="v1", regularizer="hybrid")
    with pytest.raises(ConfigError, match="mxK >= Q"):
        CPDConfig(Q=30, mxK=20)
    with pytest.raises(ConfigError, match="fewer|only"):
        CPD(CPDConfig(Q=5, mxK=20), student_dim=4, teacher_dim=8, num_items=I, topn=_teacher_lists(N=3))


def test_sld_gradient_vanishes_when_student_equals_teacher_plus_a_constant():
    z_t = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    z_s = (z_t + 7.0).requires_grad_(True)
    soft_label_ce(z_s, z_t, tau=2.0).sum().backward()
    assert z_s.grad.abs().max() < 1e-6
    z_s2 = torch.zeros(1, 4, requires_grad=True)
    soft_label_ce(z_s2, z_t, tau=2.0).sum().backward()
    assert z_s2.grad.abs().max() > 1e-3
    # by hand: CE of the student's softmax against the teacher's
    p = torch.softmax(z_t / 2, -1)
    assert soft_label_ce(torch.zeros(1, 4), z_t, 2.0).item() == pytest.approx(
        -(p * torch.log(torch.full((4,), 0.25))).sum().item(), rel=1e-6)
    # mixture label with beta 0: the student's own (detached) distribution, no pull towards the teacher
    z3 = torch.tensor([[0.3, -1.0, 2.0, 0.0]], requires_grad=True)
    soft_label_ce(z3, z_t, 1.0, beta=0.0).sum().backward()
    assert z3.grad.abs().max() < 1e-6


def test_sld_lists_weights_and_dedup():
    torch.manual_seed(0)
    student, teacher = BPR(U, I, 4, init_std=0.5), BPR(U, I, 8, init_std=0.5)
    topn = _teacher_lists()
    cfg = SLDConfig(K=4, w_t=0.0, w_a=1.0, tau=1.0, lambda_s=2.0)
    sld = SLD(cfg, topn=topn, num_items=I)
    assert sld.student_topk_request() == (4, True)
    s_top = torch.as_tensor(_teacher_lists(seed=1)[:, :4])
    sld.on_epoch_start(0, torch.Generator().manual_seed(0))
    sld.set_student_topk(s_top)
    assert sld.teacher_request(_batch()) is None  # no per-batch teacher lookups: the lists are scored per epoch
    b = _batch()
    with pytest.raises(RuntimeError, match="set_teacher_scores"):
        sld.losses(batch=b, student=student, teacher=None)
    _score_epoch_lists(sld, teacher)
    got = sld.losses(batch=b, student=student, teacher=None)["kd/sld"]
    # by hand: per unique user, CE over [student top-4 ; teacher top-4], weighted by its rows in the batch
    want = 0.0
    for u, n in ((0, 1), (1, 2), (3, 1), (5, 1)):
        items = torch.cat([s_top[u], torch.as_tensor(topn[u, :4])]).unsqueeze(0)
        with torch.no_grad():
            z_t = teacher.score(torch.tensor([u]), items)
            z_s = student.score(torch.tensor([u]), items)
        want += n * soft_label_ce(z_s, z_t, 1.0).item()
    assert got.item() == pytest.approx(2.0 * want, rel=1e-5)
    got.backward()
    assert student.item_emb.weight.grad.abs().sum() > 0
    # dedup: a list whose halves coincide counts every item once
    sld_d = SLD(SLDConfig(K=4, dedup=True), topn=topn, num_items=I)
    sld_d.set_student_topk(torch.as_tensor(topn[:, :4]))
    lists = sld_d._lists(torch.tensor([0]))
    _, items, keep, _ = lists[0]
    assert keep.sum().item() == 4 and items.shape == (1, 8)
    with pytest.raises(ConfigError, match="w_t \\+ w_a"):
        SLDConfig(w_t=0.6, w_a=0.6)


def test_sld_sampled_reading_draws_from_the_teacher_list_and_outside_it():
    topn = _teacher_lists(N=10)
    indptr = np.arange(0, 2 * U + 1, 2)
    indices = np.array([[29, 28]] * U).reshape(-1)
    indices = np.where(np.isin(indices, topn), 27, indices)
    sld = SLD(SLDConfig(lists="sampled", K=3, mxK=10, L=4), topn=topn, num_items=I, train_csr=(indptr, indices))
    assert sld.student_topk_request() is None
    sld.on_epoch_start(0, torch.Generator().manual_seed(0))
    assert sld.sampled.shape == (U, 7)
    for u in range(U):
        assert set(sld.sampled[u, :3].tolist()) <= set(topn[u].tolist())
        rest = set(sld.sampled[u, 3:].tolist())
        assert not rest & set(topn[u].tolist()) and not rest & set(indices[2 * u: 2 * u + 2].tolist())


def test_mkd_combines_components_with_one_teacher_lookup_and_ablates_by_config():
    torch.manual_seed(0)
    student, teacher = BPR(U, I, 4, init_std=0.5), BPR(U, I, 8, init_std=0.5)
    topn = _teacher_lists()
    user_nn = np.stack([(np.arange(U) + 1) % U, (np.arange(U) + 2) % U], 1)
    item_nn = np.stack([(np.arange(I) + 1) % I, (np.arange(I) + 2) % I], 1)
    parts = {
        "nkd": NKD(NKDConfig(K=2), student_dim=4, teacher_dim=8, user_nn=user_nn, item_nn=item_nn),
        "cpd": CPD(CPDConfig(Q=4, mxK=20), student_dim=4, teacher_dim=8, num_items=I, topn=topn),
        "sld": SLD(SLDConfig(K=5), topn=topn, num_items=I),
    }
    mkd = MKD(parts)
    assert mkd.student_topk_request() == (5, True)
    mkd.on_epoch_start(0, torch.Generator().manual_seed(0))
    mkd.set_student_topk(torch.as_tensor(_teacher_lists(seed=3)[:, :5]))
    _score_epoch_lists(mkd, teacher)  # SLD's lists, [U, 2K]
    b = _batch()
    req = mkd.teacher_request(b)
    ans = _answer(teacher, req)
    terms = mkd.losses(batch=b, student=student, teacher=ans)
    assert {"kd/nkd", "kd/cpd_fd", "kd/cpd_pair", "kd/cpd_list", "kd/sld"} <= set(terms)
    # each component got its own slice of the one answer, and its own random stream: MKD with NKD alone (the
    # ablation) gives the same NKD term on the same batch
    alone = MKD({"nkd": parts["nkd"]})
    alone.on_epoch_start(0, torch.Generator().manual_seed(0))
    b2 = _batch()
    ans2 = _answer(teacher, alone.teacher_request(b2))
    assert alone.losses(batch=b2, student=student, teacher=ans2)["kd/nkd"].item() == pytest.approx(
        terms["kd/nkd"].item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ConfigError, match="components"):
        MKDConfig(components=["nkd", "xyz"])
    with pytest.raises(ConfigError, match="no component"):
        MKD({})


def test_mkd_needs_follow_the_components():
    from rayrec.config import DistillConfig
    from rayrec.distill import needs

    dc = DistillConfig(method="mkd")
    assert needs(dc) == needs(DistillConfig(method="mkd", mkd=MKDConfig(components=["nkd", "cpd", "sld"])))
    assert needs(dc).checkpoint and needs(dc).lists and needs(dc).neighbors
    only_nkd = DistillConfig(method="mkd", mkd=MKDConfig(components=["nkd"]))
    assert not needs(only_nkd).lists and needs(only_nkd).neighbors
    no_nkd = DistillConfig(method="mkd", nkd=NKDConfig(lambda_n=0.0))
    assert not needs(no_nkd).neighbors and needs(no_nkd).lists


def test_student_topk_single_process_matches_a_dense_ranking():
    from rayrec.eval.evaluate import CSR
    from rayrec.train.student_rank import student_topk

    torch.manual_seed(0)
    users = np.array([0, 0, 1, 2, 3, 4, 5, 5])
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    model = LightGCN(U, I, 4, layers=2, train_users=users, train_items=items)
    csr = CSR.from_pairs(users, items, U)
    got = student_topk(model, U, 5, csr, chunk=4)
    with torch.no_grad():
        s = model.score_all(torch.arange(U))
    s[torch.as_tensor(users), torch.as_tensor(items)] = -torch.inf
    assert torch.equal(got, s.topk(5, dim=1).indices)
    assert not any(int(i) in items[users == u] for u in range(U) for i in got[u])


def test_sld_soft_label_ce_is_finite_and_exact_for_scores_of_1e4():

    z_s = torch.tensor([[1e4, -1e4, 5e3, 0.0], [-1e4, -1e4, 1e4, 3.0]], requires_grad=True)  # [B=2, C=4]
    z_t = torch.tensor([[-1e4, 1e4, 0.0, 2.0], [1e4, -1e4, -5e3, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    for tau, beta, m in ((1.0, 1.0, None), (0.1, 0.5, mask), (5.0, 1.0, mask)):
        loss = soft_label_ce(z_s, z_t, tau, beta, m)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z_s.grad).all(), (tau, beta)
        z_s.grad = None
        # reference in float64 with an explicit log-sum-exp
        s, t = z_s.detach().double(), z_t.double()
        keep = torch.ones_like(s, dtype=torch.bool) if m is None else m
        s, t = s.masked_fill(~keep, -torch.inf), t.masked_fill(~keep, -torch.inf)
        p_t = torch.softmax(t / tau, dim=1)
        label = beta * p_t + (1 - beta) * torch.softmax(s / tau, dim=1)
        logp = (s / tau - torch.logsumexp(s / tau, dim=1, keepdim=True)).masked_fill(~keep, 0.0)
        want = -(label * logp).sum(dim=1)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-2)
