import pytest
import torch
import torch.nn.functional as F

from rayrec.models import BPR, NeuMF, build_model, expected_num_parameters


@pytest.mark.parametrize("name, dim, params", [("bpr", 20, 608_040), ("bpr", 200, 6_080_400), ("neumf", 25, 1_521_426), ("neumf", 250, 15_326_751)])
def test_parameter_counts_match_derrd_table3(name, dim, params):
    # DE-RRD Table 3 (CiteULike, counts 5220 x 25182): 0.61M / 6.08M BPR, 1.52M / 15.33M NeuMF.
    m = build_model(name, 5220, 25182, dim)
    assert m.num_parameters() == expected_num_parameters(name, 5220, 25182, dim) == params


def test_bpr_scores_and_loss_by_hand():
    m = BPR(2, 3, 2)
    with torch.no_grad():
        m.user_emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        m.item_emb.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]))
    s = m.score(torch.tensor([0, 1]), torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(s, torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, -2.0]]))
    assert torch.equal(m.score_all(torch.tensor([0, 1])), s)
    loss = m.base_loss(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([[2], [2]]))
    # −log σ(2 − 0) − log σ(2 − (−2))
    assert loss.item() == pytest.approx(-(F.logsigmoid(torch.tensor(2.0)) + F.logsigmoid(torch.tensor(4.0))).item())
    assert m.base_loss(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([[2], [2]]), "mean").item() == pytest.approx(loss.item() / 2)


def test_neumf_score_all_equals_candidate_scores_and_bce():
    m = NeuMF(5, 7, 4)
    u = torch.arange(5)
    cand = torch.arange(7).expand(5, -1)
    assert torch.allclose(m.score_all(u, item_chunk=3), m.score(u, cand), atol=1e-6)
    pos, neg = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([[6], [5], [4], [3], [2]])
    logits = m.score(u, torch.cat([pos[:, None], neg], 1))
    want = -(F.logsigmoid(logits[:, 0]).sum() + F.logsigmoid(-logits[:, 1]).sum())
    assert m.base_loss(u, pos, neg).item() == pytest.approx(want.item(), rel=1e-5)


def test_representations_exposed():
    b, n = BPR(4, 6, 3), NeuMF(4, 6, 3)
    assert b.user_repr(torch.tensor([0, 1]))["emb"].shape == (2, 3)
    assert b.item_repr(torch.tensor([[0, 1, 2]]))["emb"].shape == (1, 3, 3)
    assert set(n.user_repr(torch.tensor([0]))) == {"gmf", "mlp"}
    assert set(n.item_repr(torch.tensor([0]))) == {"gmf", "mlp"}


def test_init_std():
    m = BPR(2000, 2000, 50, init_std=0.01)
    assert m.user_emb.weight.std().item() == pytest.approx(0.01, rel=0.05)
