"""Each distillation loss on hand-computable tensors, the schedules, the list sampling, and where gradients go."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayrec.distill.base import DistillBatch, TeacherAnswer
from rayrec.distill.cd import CD, CDConfig
from rayrec.distill.de import DE, DEConfig, Experts, tau_at
from rayrec.distill.lists import Uninteresting, rank_discounted
from rayrec.distill.losses import relaxed_ranking_nll, soft_bce, weighted_log_sigmoid_nll
from rayrec.distill.rd import RD, RDConfig
from rayrec.distill.rrd import RRD, RRDConfig
from rayrec.errors import ConfigError
from rayrec.models import BPR, NeuMF


def test_relaxed_ranking_two_items_by_hand():
    a1, a2, b1, b2 = 2.0, 0.5, 1.0, -1.0
    got = relaxed_ranking_nll(torch.tensor([[a1, a2]]), torch.tensor([[b1, b2]]))
    e = math.exp
    want = -(a1 - math.log(e(a1) + e(a2) + e(b1) + e(b2))) - (a2 - math.log(e(a2) + e(b1) + e(b2)))
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-6)
    # without uninteresting items: the plain Plackett-Luce likelihood of the order (a1, a2)
    want_pl = -(a1 - math.log(e(a1) + e(a2))) - 0.0
    assert relaxed_ranking_nll(torch.tensor([[a1, a2]])).item() == pytest.approx(want_pl, rel=1e-6)


def test_relaxed_ranking_is_finite_for_huge_scores_and_prefers_the_teacher_order():
    a = torch.tensor([[1e4, -1e4, 5e3]], requires_grad=True)
    b = torch.tensor([[1e4, -1e4]])
    loss = relaxed_ranking_nll(a, b)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(a.grad).all()
    good = relaxed_ranking_nll(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0.0]]))
    bad = relaxed_ranking_nll(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0]]))
    assert good.item() < bad.item()


def _nll_reference(a, b):  # the likelihood written with logcumsumexp, in float64
    suffix = torch.logcumsumexp(a.flip(1), dim=1).flip(1)
    if b is not None:
        suffix = torch.logaddexp(suffix, torch.logsumexp(b, dim=1, keepdim=True))
    return -(a - suffix).sum(dim=1)


@pytest.mark.parametrize("with_b", [True, False])
def test_relaxed_ranking_matches_the_logcumsumexp_form_values_and_gradients(with_b):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 7, generator=g) * 4
    b = torch.randn(64, 5, generator=g) * 4
    a[3], b[3] = torch.tensor([1e4, -1e4, 5e3, 0, 1, 2, 3]), torch.tensor([1e4, -1e4, 0, 0, 0])  # underflowing rows
    a[5, 6] = -200.0  # one term far below the rest: its suffix sum underflows
    a[9] = 30.0  # ties
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    want = _nll_reference(a64, b64 if with_b else None)
    want.sum().backward()
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = relaxed_ranking_nll(a32, b32 if with_b else None)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(a32.grad).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-3)
    # float32 resolves scores of 5e3 to ~5e-4: the ±1e4 row is compared at that resolution, the others tightly
    rows = torch.arange(64) != 3
    for g32, g64 in [(a32.grad, a64.grad), *([(b32.grad, b64.grad)] if with_b else [])]:
        torch.testing.assert_close(g32[rows].double(), g64[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g32[3].double(), g64[3], rtol=0, atol=1e-3)


def test_rd_and_cd_losses_by_hand():
    s, w = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.7, 0.3]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert weighted_log_sigmoid_nll(s, w).item() == pytest.approx(-(0.7 * math.log(sig(0.3)) + 0.3 * math.log(sig(-1.2))))
    q = torch.tensor([[0.9, 0.2]])
    want = -(0.9 * math.log(sig(0.3)) + 0.1 * math.log(1 - sig(0.3))) - (0.2 * math.log(sig(-1.2)) + 0.8 * math.log(1 - sig(-1.2)))
    assert soft_bce(s, q).item() == pytest.approx(want, rel=1e-6)


def test_tau_schedule_values():
    c = DEConfig()
    assert tau_at(c, 0) == tau_at(c, 1) == 1.0  # the code updates tau after each epoch
    assert tau_at(c, 51) == pytest.approx(10 ** -0.5)
    assert tau_at(c, 101) == pytest.approx(0.1)
    assert tau_at(c, 201) == pytest.approx(0.01)
    assert tau_at(c, 1001) == pytest.approx(1e-10) and tau_at(c, 5000) == pytest.approx(1e-10)
    lin = DEConfig(schedule="linear", tau_end=0.5, anneal_epochs=10)
    assert tau_at(lin, 6) == pytest.approx(0.75) and tau_at(DEConfig(schedule="constant"), 300) == 1.0


def test_de_loss_is_zero_when_the_mapped_student_equals_the_teacher():
    torch.manual_seed(0)
    ex = Experts(M=3, d_s=4, d_t=6)
    with torch.no_grad():  # every expert identical: the selection cannot matter
        for p in (ex.w1, ex.b1, ex.w2, ex.b2):
            p[1:] = p[0]
    h_s = torch.randn(5, 4)
    h_t = ex.expert_outputs(h_s)[:, 0].detach()
    assert torch.allclose(ex(h_s, h_t, tau=0.5), torch.zeros(5), atol=1e-10)
    assert (ex(h_s, h_t + 1.0, tau=0.5) - 6.0).abs().max() < 1e-5  # ||1||^2 over 6 dims


def _tiny_batch():
    return DistillBatch(torch.tensor([0, 1, 1, 3]), torch.tensor([2, 3, 4, 2]), torch.tensor([[5], [6], [5], [7]]))


def test_de_gradients_reach_experts_and_selection_but_not_the_teacher():
    torch.manual_seed(0)
    U, I = 5, 9
    student, teacher = BPR(U, I, 4, init_std=0.5), BPR(U, I, 8, init_std=0.5)
    de = DE(DEConfig(M=3, lambda_de=0.01), student_dim=4, teacher_dim=8, parts=["emb"])
    de.on_epoch_start(0, torch.Generator().manual_seed(0))
    b = _tiny_batch()
    req = de.teacher_request(b)
    ans = TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))  # with grad on purpose
    terms = de.losses(batch=b, student=student, teacher=ans)
    assert set(terms) == {"kd/de"}
    terms["kd/de"].backward()
    for side in (de.users["emb"], de.items["emb"]):
        assert side.w1.grad.abs().sum() > 0 and side.w2.grad.abs().sum() > 0
        assert side.select.weight.grad.abs().sum() > 0  # tau = 1: the selection network learns
    assert student.user_emb.weight.grad.abs().sum() > 0
    assert teacher.user_emb.weight.grad is None and teacher.item_emb.weight.grad is None
    # by hand: λ · (Σ_users + 0.5 (Σ_pos + Σ_neg)) of the per-entity losses, same Gumbel draws
    de.generator = torch.Generator().manual_seed(3)
    got = de.losses(batch=b, student=student, teacher=ans)["kd/de"]
    g = torch.Generator().manual_seed(3)
    t_u, t_i = ans.user["emb"].detach(), ans.item["emb"].detach()
    lu = de.users["emb"](student.user_repr(b.uniq_users)["emb"], t_u, de.tau, g)
    li = de.items["emb"](student.item_repr(req.items)["emb"], t_i, de.tau, g)
    n_pos = len(b.uniq_pos)
    assert lu.shape == (3,) and li.shape == (3 + 3,)
    assert got.item() == pytest.approx(0.01 * (lu.sum() + 0.5 * (li[:n_pos].sum() + li[n_pos:].sum())).item(), rel=1e-5)


def test_de_counts_its_expert_work_per_epoch():
    # the dense mixture (τ = 1) runs every entity through all M experts; once the selection is one-hot (tiny τ)
    # the sparse path runs one expert per entity; the count restarts with each epoch
    torch.manual_seed(0)
    student, teacher = BPR(5, 9, 4, init_std=0.5), BPR(5, 9, 8, init_std=0.5)
    de = DE(DEConfig(M=6, tau_start=1.0, tau_end=1e-10, anneal_epochs=2), student_dim=4, teacher_dim=8, parts=["emb"])
    b = _tiny_batch()
    req = de.teacher_request(b)
    with torch.no_grad():
        ans = TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))
    entities = len(b.uniq_users) + len(b.uniq_pos) + len(b.uniq_neg)  # 3 + 3 + 3
    per_pair = 6 * (4 * 6 + 6 * 8)  # hidden (4 + 8) // 2 = 6: forward 2 (D_s H + H D_t), backward twice that
    for epoch, pairs in ((0, 6 * entities), (3, entities)):
        de.on_epoch_start(epoch, torch.Generator().manual_seed(0))
        de.losses(batch=b, student=student, teacher=ans)
        de.losses(batch=b, student=student, teacher=ans)
        m = de.epoch_metrics()
        assert m["kd/de_evaluations"] == 2 * pairs
        assert m["kd/de_gflop"] == pytest.approx(2 * pairs * per_pair / 1e9)


def test_neumf_de_distills_gmf_and_mlp_separately():
    student, teacher = NeuMF(5, 9, 4), NeuMF(5, 9, 8)
    de = DE(DEConfig(M=2), student_dim=4, teacher_dim=8, parts=["gmf", "mlp"])
    b = _tiny_batch()
    req = de.teacher_request(b)
    with torch.no_grad():
        ans = TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))
    de.losses(batch=b, student=student, teacher=ans)["kd/de"].backward()
    assert all(de.users[p].w1.grad is not None for p in ("gmf", "mlp"))
    # experts are training-only: the student's parameter count is the base model's
    assert sum(p.numel() for p in student.parameters()) == NeuMF(5, 9, 4).num_parameters()


def _gumbel_top_k(U, N, K, T, seed):
    """The plain Gumbel-top-k over all N ranks of every row: the distribution rank_discounted draws from."""
    u = torch.rand(U, N, generator=torch.Generator().manual_seed(seed))
    keys = -torch.arange(N, dtype=torch.float32) / T - torch.log(-torch.log(u + 1e-20) + 1e-20)
    return torch.topk(keys, K, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("U,N,K,T,head", [(5220, 500, 40, 10.0, None), (20000, 200, 5, 3.0, None),
                                          (200_000, 6, 2, 1.0, 2), (100_000, 12, 3, 2.0, 4)])
def test_rank_discounted_draws_like_the_top_k_of_all_gumbel_keys(U, N, K, T, head):
    # the shortcut (the first R ranks, the later ranks' maximum, and the rest of them only where it could enter)
    # against the plain Gumbel-top-k: the frequency of each rank, and for N = 6 of each pair; a small head makes
    # the later ranks enter often
    got = rank_discounted(U, N, K, T, torch.Generator().manual_seed(1), head=head)
    want = _gumbel_top_k(U, N, K, T, seed=2)
    assert got.shape == (U, K) and (got[:, 1:] > got[:, :-1]).all() and got.min() >= 0 and got.max() < N
    f_got = torch.bincount(got.flatten(), minlength=N).double() / got.numel()
    f_want = torch.bincount(want.flatten(), minlength=N).double() / want.numel()
    torch.testing.assert_close(f_got, f_want, rtol=0, atol=4e-3)
    if N == 6:  # the joint law: each of the 15 pairs
        pairs = lambda r: torch.bincount(r[:, 0] * N + r[:, 1], minlength=N * N).double() / len(r)  # noqa: E731
        torch.testing.assert_close(pairs(got), pairs(want), rtol=0, atol=4e-3)
        assert (got >= head).any(dim=1).float().mean() > 0.2  # the later ranks did enter, often


def test_native_gumbel_head_chooses_what_topk_chooses(native_kernels):
    # the first R ranks' keys and their top K: the native selection against torch.topk over the same uniforms,
    # R not a multiple of 16 (the kernel's scalar tail), and ties (equal uniforms at equal logits: T huge)
    from rayrec.distill.lists import _gumbel

    for B, R, K, T in ((5000, 120, 40, 10.0), (3000, 37, 5, 2.0), (2000, 24, 24, 3.0), (500, 20, 7, 1e30)):
        u = torch.rand(B, R, generator=torch.Generator().manual_seed(R))
        if T == 1e30:
            u[:, 10:] = u[:, :10]  # every key twice: the smaller rank wins the tie
        ranks, kth = native_kernels.gumbel_topk_head(u, T, K)
        top = torch.topk(-torch.arange(R, dtype=torch.float32) / T + _gumbel(u), K, dim=1)
        want = top.indices.sort(dim=1).values
        if T == 1e30:  # torch.topk breaks ties its own way: compare the chosen keys, and the smaller-rank rule
            keys = -torch.arange(R, dtype=torch.float32) / T + _gumbel(u)
            assert torch.equal(keys.gather(1, ranks).sort(dim=1).values, keys.gather(1, want).sort(dim=1).values)
            assert ((ranks < 10).sum(1) == 4).all()  # 3 tied pairs whole, and of the 4th the smaller rank
        else:
            assert torch.equal(ranks, want)
        torch.testing.assert_close(kth, top.values[:, -1], rtol=1e-6, atol=1e-6)  # logs may round apart


@pytest.mark.parametrize("native", [True, False])
def test_rank_discounted_is_the_same_with_and_without_the_kernels(monkeypatch, native):
    if not native:
        monkeypatch.setattr("rayrec.kernels.native", lambda: None)
    got = rank_discounted(3000, 500, 40, 10.0, torch.Generator().manual_seed(3))
    monkeypatch.undo()
    from rayrec.kernels import native as lib

    if lib() is None:
        pytest.skip("native kernels not built")
    assert torch.equal(got, rank_discounted(3000, 500, 40, 10.0, torch.Generator().manual_seed(3)))


def test_rank_discounted_sampling_keeps_teacher_order_and_follows_the_discount():
    g = torch.Generator().manual_seed(0)
    r = rank_discounted(4000, 50, 5, 10.0, g)
    assert r.shape == (4000, 5) and (r[:, 1:] > r[:, :-1]).all()  # distinct, ascending
    freq = torch.bincount(r.flatten(), minlength=50).float() / r.numel()
    assert freq[0] > freq[10] > freq[30]
    top = rank_discounted(3, 40, 40, 10.0, g)  # K = N: every rank, in order
    assert torch.equal(top, torch.arange(40).expand(3, -1))


def test_uninteresting_items_avoid_train_and_teacher_lists():
    indptr, indices = np.array([0, 2, 3]), np.array([0, 1, 2])
    topn = np.array([[3, 4, -1], [5, 6, 7]])
    un = Uninteresting(indptr, indices, topn, num_items=12)
    s = un.sample(torch.tensor([0, 1] * 50), 5, torch.Generator().manual_seed(0))
    for row, u in zip(s.tolist(), [0, 1] * 50):
        assert len(set(row)) == 5
        banned = {0, 1, 3, 4} if u == 0 else {2, 5, 6, 7}
        assert not set(row) & banned


def test_rrd_loss_matches_the_relaxed_likelihood_of_its_lists():
    torch.manual_seed(0)
    U, I = 4, 30
    student = BPR(U, I, 3, init_std=0.5)
    topn = np.stack([np.random.default_rng(u).permutation(np.arange(5, I))[:10] for u in range(U)])
    indptr, indices = np.array([0, 2, 3, 5, 6]), np.array([0, 1, 2, 3, 4, 1])
    rrd = RRD(RRDConfig(K=3, L=4, lambda_rrd=0.5), topn=topn, train_indptr=indptr, train_indices=indices, num_items=I)
    rrd.on_epoch_start(0, torch.Generator().manual_seed(0))
    b = _tiny_batch()
    got = rrd.losses(batch=b, student=student, teacher=None)["kd/rrd"]
    want = 0.0
    for u in b.uniq_users.tolist():
        inter, un = rrd.inter[u], rrd.unint[u]
        assert set(inter.tolist()) <= set(topn[u].tolist()) and not set(un.tolist()) & set(topn[u].tolist())
        pos = [topn[u].tolist().index(i) for i in inter.tolist()]
        assert pos == sorted(pos)  # teacher order kept
        s = student.score(torch.tensor([u]), torch.cat([inter, un]).view(1, -1))
        want = want + relaxed_ranking_nll(s[:, :3], s[:, 3:]).sum()
    assert got.item() == pytest.approx(0.5 * want.item(), rel=1e-5)
    top = RRD(RRDConfig(K=3, L=0, interesting="top"), topn=topn, train_indptr=indptr, train_indices=indices, num_items=I)
    top.on_epoch_start(3, torch.Generator().manual_seed(0))
    assert torch.equal(top.inter, torch.as_tensor(topn[:, :3]))


def test_rd_and_cd_methods():
    torch.manual_seed(0)
    student = BPR(4, 30, 3, init_std=0.5)
    topn = np.tile(np.arange(10, 20), (4, 1))
    scores = np.tile(np.linspace(3, -3, 10, dtype=np.float32), (4, 1))
    rd = RD(RDConfig(K=4, mu=2.0, lambda_rd=1.0), topn=topn)
    b = _tiny_batch()
    w = torch.exp(-torch.arange(1, 5) / 2.0)
    w = w / w.sum()
    s = student.score(b.uniq_users, torch.as_tensor(topn[:3, :4]))
    assert rd.losses(batch=b, student=student, teacher=None)["kd/rd"].item() == pytest.approx(
        weighted_log_sigmoid_nll(s, w.expand(3, -1)).sum().item(), rel=1e-5)
    cd = CD(CDConfig(k=3, lambda_cd=1.0), topn=topn, topn_scores=scores)
    cd.on_epoch_start(0, torch.Generator().manual_seed(0))
    assert cd.ranks.shape == (4, 3) and torch.isfinite(cd.losses(batch=b, student=student, teacher=None)["kd/cd"])


def test_nkd_mixing_projector_and_loss_by_hand():
    from rayrec.distill.nkd import NKD, NKDConfig, mix_coefficients

    g = torch.Generator().manual_seed(0)
    soft = mix_coefficients((2000, 4), "soft", 0.5, g)
    assert 0 <= soft.min() and soft.max() <= 1.0 and abs(soft.mean().item() - 0.5) < 0.02
    hard = mix_coefficients((2000, 4), "hard", 0.7, g)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and abs(hard.mean().item() - 0.7) < 0.03
    hm = mix_coefficients((50, 4), "hardmix", 0.5, g)
    assert (hm == hm[:, :1]).all()  # one decision per entity
    assert (mix_coefficients((3, 2), "mix", 0.3, g) == 0.3).all()

    torch.manual_seed(0)
    U, I = 4, 9
    student, teacher = BPR(U, I, 4, init_std=0.5), BPR(U, I, 6, init_std=0.5)
    user_nn = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    item_nn = np.stack([(np.arange(I) + 1) % I, (np.arange(I) + 2) % I], 1)
    nkd = NKD(NKDConfig(K=2, strategy="mix", alpha=1.0, lambda_n=2.0), student_dim=4, teacher_dim=6,
              user_nn=user_nn, item_nn=item_nn)
    nkd.on_epoch_start(0, torch.Generator().manual_seed(1))
    b = _tiny_batch()
    req = nkd.teacher_request(b)
    nu, ni = b.extras["nkd"]
    assert all(int(n) in user_nn[int(u)] for u, n in zip(b.uniq_users, nu))  # a neighbour of each entity
    with torch.no_grad():
        ans = TeacherAnswer(user=teacher.user_repr(req.users), item=teacher.item_repr(req.items))
    got = nkd.losses(batch=b, student=student, teacher=ans)["kd/nkd"]
    # alpha = 1 with "mix": no neighbour mixed in, so the loss is the plain cosine distance of the entity itself
    with torch.no_grad():
        cos_u = 1 - F.cosine_similarity(teacher.user_emb(b.uniq_users), nkd.user_proj(student.user_emb(b.uniq_users)))
        items = torch.cat([b.uniq_pos, b.uniq_neg])
        cos_i = 1 - F.cosine_similarity(teacher.item_emb(items), nkd.item_proj(student.item_emb(items)))
    n_pos = len(b.uniq_pos)
    want = 2.0 * (cos_u.sum() + 0.5 * (cos_i[:n_pos].sum() + cos_i[n_pos:].sum()))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert nkd.user_proj.w1.grad.abs().sum() > 0 and student.item_emb.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="rank.user_neighbors >= 3"):
        NKD(NKDConfig(K=3), student_dim=4, teacher_dim=6, user_nn=user_nn, item_nn=item_nn)


def test_de_rrd_parts_switch_off_by_their_weight():
    from rayrec.config import load_config
    from rayrec.distill import build_method

    csr = (np.array([0, 1, 2, 3, 4]), np.array([0, 1, 2, 3]))
    cfg = load_config([], ["distill.method=de_rrd", "distill.rrd.lambda_rrd=0", "distill.teacher.dim=8"])
    m = build_method(cfg.distill, student_name="bpr", student_dim=4, num_items=9, train_csr=csr)  # no lists needed
    assert m.rrd is None and m.de is not None and m.needs_teacher and not m.needs_ranking
    topn = np.tile(np.arange(4, 9), (4, 1))
    cfg = load_config([], ["distill.method=de_rrd", "distill.de.lambda_de=0", "distill.rrd.K=3", "distill.rrd.L=1"])
    m = build_method(cfg.distill, student_name="bpr", student_dim=4, num_items=9, train_csr=csr, topn=topn)
    assert m.de is None and m.rrd is not None and not m.needs_teacher
    assert sum(p.numel() for p in m.parameters()) == 0  # no experts built into the optimiser when DE is off


def test_de_sparse_mixture_matches_all_experts_when_the_selection_is_nearly_one_hot():
    from rayrec.distill.de import ExpertMLPs

    torch.manual_seed(0)
    ex = ExpertMLPs(6, 4, 10)
    h = torch.randn(50, 4, requires_grad=True)
    logits = torch.randn(50, 6, requires_grad=True)
    s = torch.softmax(logits / 0.01, dim=-1)  # late in the annealing: one-hot up to tiny weights
    assert int((s >= 1e-6).sum()) <= 50 * 6 // 5  # the sparse path is taken
    dense = ex.mixture(h, s)
    sparse = ex.mixture(h, s, skip_below=1e-6)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    params = [h, logits, ex.w1, ex.b1, ex.w2, ex.b2]
    g_dense = torch.autograd.grad(dense.square().sum(), params, retain_graph=True)
    g_sparse = torch.autograd.grad(sparse.square().sum(), params)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # a soft selection keeps the dense path (every expert counts)
    soft = torch.softmax(torch.randn(50, 6), dim=-1)
    torch.testing.assert_close(ex.mixture(h, soft, skip_below=1e-6), ex.mixture(h, soft))


@pytest.mark.parametrize("bf16", [False, True])
def test_de_grouped_sparse_experts_equal_the_per_expert_loop(monkeypatch, bf16):
    """The CPU sparse path's grouped GEMMs (odd widths, zero-padded to the kernel's 16-byte strides; experts that no
    entity chose) give the per-expert loop's output and gradients."""
    import rayrec.distill.de as de_mod

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm: the loop is the only path")
    torch.manual_seed(0)
    ex = de_mod.ExpertMLPs(7, 5, 11, bf16=bf16)  # H = 8; D_s 5 and D_t 11 need padding
    h = torch.randn(40, 5, requires_grad=True)
    logits = torch.full((40, 7), -30.0)
    logits[torch.arange(40), torch.arange(40) % 3] = 0.0  # experts 3..6 unused
    logits.requires_grad_(True)
    s = torch.softmax(logits, dim=-1)
    params = [h, logits, ex.w1, ex.b1, ex.w2, ex.b2]
    calls = []
    real = de_mod._grouped_experts
    monkeypatch.setattr(de_mod, "_grouped_experts", lambda *a: calls.append(1) or real(*a))
    grouped = ex.mixture(h, s, skip_below=1e-6)
    g_grouped = torch.autograd.grad(grouped.square().sum(), params, retain_graph=True)
    assert calls  # the grouped path ran
    monkeypatch.delattr(torch, "_grouped_mm")
    loop = ex.mixture(h, s, skip_below=1e-6)
    g_loop = torch.autograd.grad(loop.square().sum(), params)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, loop, **tol)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, **tol)
    assert float(g_grouped[2][3:].abs().sum()) == 0  # unused experts get no gradient


@pytest.mark.parametrize("tau", [1.0, 1e-3])  # the dense (soft) and the sparse (nearly one-hot) mixture
def test_de_bf16_experts_track_fp32_and_train_every_part(tau):
    torch.manual_seed(0)
    ex = Experts(30, 20, 200)
    h_s, h_t = torch.randn(256, 20, requires_grad=True), torch.randn(256, 200)
    g32, g16 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    fp32 = ex(h_s, h_t, tau, g32)
    ex.bf16 = True  # what distill.de.precision=bf16 builds
    bf16 = ex(h_s, h_t, tau, g16)
    assert bf16.dtype == torch.float32 and bf16.shape == (256,)
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=1e-2)  # bfloat16 keeps 8 bits of mantissa
    grads = torch.autograd.grad(bf16.sum(), [h_s, ex.w1, ex.w2, ex.select.weight])
    assert all(g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads)
    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        DEConfig(precision="fp16")
    assert all(e.bf16 for e in DE(DEConfig(precision="bf16"), student_dim=20, teacher_dim=200, parts=["emb"]).modules()
               if isinstance(e, Experts))


def test_bf16_projectors_of_nkd_cpd_htd_track_fp32():
    """precision=bf16 reaches every projector of NKD, CPD (both forms) and HTD; a bf16 projector's output and its
    gradients stay float32 and close to the fp32 projector's with the same weights."""
    from rayrec.distill.cpd import CPD, CPDConfig
    from rayrec.distill.htd import HTD, HTDConfig
    from rayrec.distill.nkd import NKD, MeanProjector, NKDConfig

    nn_lists = np.zeros((4, 5), dtype=np.int64)
    built = [NKD(NKDConfig(precision="bf16"), student_dim=20, teacher_dim=200, user_nn=nn_lists, item_nn=nn_lists),
             *(CPD(CPDConfig(form=f, regularizer="pair", pair_sample="uniform", precision="bf16"), student_dim=20,
                   teacher_dim=200, num_items=4) for f in ("v1", "pckd")),
             HTD(HTDConfig(precision="bf16"), student_dim=20, teacher_dim=200, parts=["emb"])]
    for m in built:
        nets = [e for e in m.modules() if isinstance(e, (MeanProjector, Experts))]
        assert nets and all(e.bf16 for e in nets), type(m).__name__
    for key, cfg in (("nkd", NKDConfig), ("cpd", CPDConfig), ("htd", HTDConfig)):
        with pytest.raises(ConfigError, match=f"distill.{key}.precision must be fp32 or bf16"):
            cfg(precision="fp16")
    torch.manual_seed(0)
    proj = MeanProjector(5, 20, 200)
    x = torch.randn(512, 20, requires_grad=True)
    fp32 = proj(x)
    proj.bf16 = True
    bf16 = proj(x)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=1e-2)
    g32 = torch.autograd.grad(fp32.sum(), [x, proj.w2])
    g16 = torch.autograd.grad(bf16.sum(), [x, proj.w2])
    for a, b in zip(g32, g16):
        assert b.dtype == torch.float32 and float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99
