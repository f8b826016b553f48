"""BPR-MF: matrix factorisation trained with the Bayesian Personalised Ranking loss.

Reference: Rendle et al. "BPR: Bayesian Personalized Ranking from Implicit Feedback." UAI 2009.
Set-up as in DE-RRD's code (Kang et al., CIKM 2020): embeddings ~ N(0, 0.01), no bias, score ⟨e_u, e_i⟩.
Parameters: (U + I) · D.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.models.base import Recommender, Table, batched_dot, reduce
from rayrec.topk import dot_scores


class BPR(Recommender):
    """Matrix factorisation with inner-product scores.

    .. math::

        s(u, i) = \\langle e_u, e_i \\rangle, \\qquad
        \\mathcal{L}_{BPR} = -\\sum_{(u,i,j)} \\log \\sigma\\big(s(u,i) - s(u,j)\\big)

    Example::

        m = BPR(num_users=3, num_items=5, dim=4)
        m.score(torch.tensor([0, 2]), torch.tensor([[1, 4], [0, 3]]))   # [2, 2]
    """

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.user_emb = Table(num_users, dim)
        self.item_emb = Table(num_items, dim)
        nn.init.normal_(self.user_emb.weight, 0.0, init_std)
        nn.init.normal_(self.item_emb.weight, 0.0, init_std)

    def user_repr(self, users: Tensor) -> dict[str, Tensor]:
        return {"emb": self.user_emb(users)}  # [B, D]

    def item_repr(self, items: Tensor) -> dict[str, Tensor]:
        return {"emb": self.item_emb(items)}  # [..., D]

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        u = self.user_emb(users)  # [B, D]
        v = self.item_emb(items)  # [B, C, D]
        return batched_dot(u, v)  # [B, C]

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        return dot_scores(self.user_emb(users), self.item_emb.weight.T)  # [B, I]

    def dot_tables(self) -> tuple[Tensor, Tensor]:
        return self.user_emb.weight, self.item_emb.weight  # [U, D], [I, D]

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        u = self.user_emb(users)  # [B, D]
        s_pos = (u * self.item_emb(pos)).sum(-1, keepdim=True)  # [B, 1]
        s_neg = batched_dot(u, self.item_emb(neg))  # [B, N]
        return reduce(-F.logsigmoid(s_pos - s_neg), reduction)  # −log σ(s_ui − s_uj), Rendle Eq. (BPR-Opt)
