"""NeuMF: generalised matrix factorisation fused with an MLP, trained with binary cross-entropy.

Reference: He et al. "Neural Collaborative Filtering." WWW 2017. Layout as in DE-RRD (Kang et al., CIKM 2020)
and its authors' base-model code: GMF tables of size D, MLP tables of size D, one hidden layer [2D -> D] with
ReLU, prediction layer Linear(2D -> 1) on [GMF ⊙ ; MLP]. Parameters: 2(U + I)·D + (2D·D + D) + (2D + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.models.base import Recommender, Table, reduce


class NeuMF(Recommender):
    """GMF + one-hidden-layer MLP.

    .. math::

        \\phi_{GMF} = p_u \\odot q_i, \\quad
        \\phi_{MLP} = \\mathrm{ReLU}(W [p'_u ; q'_i] + b), \\quad
        s(u, i) = h^\\top [\\phi_{GMF} ; \\phi_{MLP}] + h_0

    Loss: :math:`-\\sum \\log \\sigma(s(u,i)) - \\sum \\log (1 - \\sigma(s(u,j)))` (positives label 1, sampled
    negatives label 0).
    """

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.gmf_user = Table(num_users, dim)
        self.gmf_item = Table(num_items, dim)
        self.mlp_user = Table(num_users, dim)
        self.mlp_item = Table(num_items, dim)
        self.mlp = nn.Linear(2 * dim, dim)
        self.predict = nn.Linear(2 * dim, 1)
        for emb in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(emb.weight, 0.0, init_std)
        nn.init.xavier_uniform_(self.mlp.weight)
        nn.init.kaiming_uniform_(self.predict.weight, a=1)
        nn.init.zeros_(self.mlp.bias)
        nn.init.zeros_(self.predict.bias)

    def user_repr(self, users: Tensor) -> dict[str, Tensor]:
        return {"gmf": self.gmf_user(users), "mlp": self.mlp_user(users)}  # each [B, D]

    def item_repr(self, items: Tensor) -> dict[str, Tensor]:
        return {"gmf": self.gmf_item(items), "mlp": self.mlp_item(items)}  # each [..., D]

    def _fuse(self, gu: Tensor, mu: Tensor, gi: Tensor, mi: Tensor) -> Tensor:
        # gu, mu: [B, 1, D]; gi, mi: [B, C, D]
        gmf = gu * gi  # [B, C, D]
        # W [p'_u; q'_i] + b = (W_u p'_u + b) + W_i q'_i: the user half once per row, not once per candidate
        D = self.dim
        mlp = F.relu(F.linear(mu, self.mlp.weight[:, :D], self.mlp.bias) + F.linear(mi, self.mlp.weight[:, D:]))
        return self.predict(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)  # [B, C]

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        return self._fuse(
            self.gmf_user(users).unsqueeze(1), self.mlp_user(users).unsqueeze(1),
            self.gmf_item(items), self.mlp_item(items),
        )

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        """Every item's score ``[B, I]`` through the split head (no gradient): the MLP's item half once per item,
        its user half once per user, the ``[B, c, D]`` ReLU block one chunk of items at a time (``item_chunk``
        items; 0: :func:`block_budget`, cache-sized on CPU)."""
        head, keys = self.row_scorer(budget_elems=max(len(users), 1) * item_chunk * self.dim if item_chunk else None)
        return head.block(head.query_repr(self.user_repr(users)), keys)  # [B, I]

    def row_scorer(self, budget_elems: int | None = None) -> tuple["SplitHead", Tensor]:
        """The split head and every item's key ``[I, 2D]``, from the current weights: evaluation scores sampled
        candidates in ``O(D)`` per pair instead of running the MLP's ``2D x D`` layer per pair."""
        head = SplitHead(self.mlp, self.predict, self.dim, budget_elems)
        with torch.no_grad():
            return head, head.key(torch.cat([self.gmf_item.weight, self.mlp_item.weight], dim=1))

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        items = torch.cat([pos.unsqueeze(1), neg], dim=1)  # [B, 1 + N]
        logits = self.score(users, items)  # [B, 1 + N]
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return reduce(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), reduction)


def block_budget(device: torch.device) -> int:
    """Elements of one ``[., ., D]`` ReLU block of :class:`SplitHead`. CPU: 64 Ki floats (256 KiB) per thread, so
    the gather, add, ReLU and mat-vec of a step run in L2: 4.4x faster than 16 Mi-float blocks for the sampled
    evaluation of a d = 252 teacher (:meth:`SplitHead.pairs`, 5,220 users x 500 candidates, one thread: 6.2 ->
    1.4 s) and 5.8 -> 1.0 s for :meth:`SplitHead.block` of 256 users x 25,182 items (random weights, 2026-12-03).
    GPU: 16 Mi elements, few kernel launches."""
    if device.type == "cpu":
        return (1 << 16) * max(1, torch.get_num_threads())
    return 1 << 24


class SplitHead:
    """NeuMF's prediction split at the first MLP layer, so that a user's half and an item's half are each computed
    once and a (user, item) score costs ``O(D)`` instead of a ``2D x D`` layer:

    .. math::

        s(u, i) = \\underbrace{(p_u \\odot h_g)}_{\\text{query}} \\cdot q_i
                  + h_m^\\top \\mathrm{ReLU}(\\underbrace{W_u p'_u}_{\\text{query}} + \\underbrace{W_i q'_i + b}_{\\text{key}}) + h_0

    Queries ``[Q, 2D]`` = ``[p_u ⊙ h_g | W_u p'_u]`` (:meth:`query` of the raw ``[gmf | mlp]`` user vectors), keys
    ``[I, 2D]`` = ``[q_i | W_i q'_i + b]`` (:meth:`key`). Used where item rows live on other ranks than the users
    (distributed ranking and evaluation of a row-sharded NeuMF): each rank turns its own item rows into keys once,
    and scores gathered queries against them. ``budget_elems`` bounds the ``[., ., D]`` ReLU block of one step;
    None picks :func:`block_budget` for the weights' device.
    """

    def __init__(self, mlp: nn.Linear, predict: nn.Linear, dim: int, budget_elems: int | None = None) -> None:
        self.dim, self.budget = dim, budget_elems or block_budget(mlp.weight.device)
        self.w_u, self.w_i, self.b = mlp.weight[:, :dim].detach(), mlp.weight[:, dim:].detach(), mlp.bias.detach()
        self.h_g, self.h_m = predict.weight[0, :dim].detach(), predict.weight[0, dim:].detach()
        self.h0 = predict.bias[0].detach()

    def query(self, users: Tensor) -> Tensor:
        """Raw user vectors ``[Q, 2D]`` (gmf | mlp) -> queries ``[Q, 2D]``."""
        D = self.dim
        return torch.cat([users[:, :D] * self.h_g, users[:, D:] @ self.w_u.T], dim=1)

    def query_repr(self, reprs: dict[str, Tensor]) -> Tensor:
        """:meth:`query` of a model's ``user_repr`` output."""
        return self.query(torch.cat([reprs["gmf"], reprs["mlp"]], dim=1))

    def key(self, items: Tensor) -> Tensor:
        """Raw item vectors ``[I, 2D]`` (gmf | mlp) -> keys ``[I, 2D]``."""
        D = self.dim
        return torch.cat([items[:, :D], items[:, D:] @ self.w_i.T + self.b], dim=1)

    def block(self, q: Tensor, k: Tensor) -> Tensor:
        """Every query against every key: ``[Q, 2D] x [I, 2D] -> [Q, I]``."""
        D = self.dim
        out = q[:, :D] @ k[:, :D].T + self.h0  # [Q, I] GMF half
        step = max(1, self.budget // max(1, q.shape[0] * D))
        for s in range(0, k.shape[0], step):
            out[:, s : s + step] += F.relu(q[:, None, D:] + k[None, s : s + step, D:]) @ self.h_m  # [Q, c, D] -> [Q, c]
        return out

    def pairs(self, q: Tensor, k: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        """Scores of the pairs ``(q[qi[n]], k[ki[n]])`` -> ``[n]``, in steps of ``budget_elems / D`` pairs; the
        halves are made contiguous once and gathered with ``index_select`` into buffers updated in place (3x faster
        on CPU than slicing gathered rows)."""
        D = self.dim
        qg, qm, kg, km = (x.contiguous() for x in (q[:, :D], q[:, D:], k[:, :D], k[:, D:]))
        out = torch.empty(len(qi), dtype=q.dtype, device=q.device)
        step = max(1, self.budget // max(1, D))
        for s in range(0, len(qi), step):
            a, c = qi[s : s + step], ki[s : s + step]
            x = km.index_select(0, c)  # [n_c, D]
            x += qm.index_select(0, a)
            out[s : s + step] = x.relu_() @ self.h_m
            x = kg.index_select(0, c)
            x *= qg.index_select(0, a)
            out[s : s + step] += x.sum(dim=1) + self.h0
        return out
