r"""UnKD — Unbiased Knowledge Distillation (Chen, Chen, Feng, Zhou & He, "Unbiased Knowledge Distillation for
Recommendation", WSDM 2023; official code ``chengang95/UnKD``: ``dataloader.py: splitGroup``,
``sample.py: UnKD``; re-implemented as ``UnKD`` in ``woriazzc/KDs``, ``modeling/KD/cf/baseline.py``).

A teacher's scores are biased towards popular items, and distilling them copies the bias. UnKD only distills
rankings **within popularity groups**, where items have similar popularity. The paper's body could not be read
here; the formulas follow the official code and the paper's notation as summarised elsewhere (:math:`\mathcal L_G`,
:math:`\mathcal L_R`, :math:`\mu`), so no equation numbers are given.

1. **Groups** (once). Items are sorted by train-interaction count :math:`c_i` (most popular first) and cut into
   ``G`` contiguous groups :math:`\mathcal G_1..\mathcal G_G`. ``split: mass`` is the code's greedy split into
   equal popularity mass :math:`\sum_{i \in \mathcal G_g} c_i \approx \sum_i c_i / G`: a group closes before the
   item that would push it over the share (an item heavier than a share forms a group alone). ``split: size``
   gives equal item counts. Items without train interactions belong to no group (the code never samples them).
2. **Pairs per group.** Group ``g`` gets :math:`n_g = \mathrm{round}(w_g\, n)` of the ``n = n_distill`` pairs
   per user (the first groups get one more until :math:`\sum_g n_g \ge n`), with the code's weights
   :math:`\tilde w_g = \mathrm{round}_2\big((\bar c_{max} + \bar c_{min} - \bar c_g) / \sum_h(\cdot)\big)`
   floored at 0.1 (:math:`\bar c_g` the group's mean count), :math:`w_g \propto \tilde w_g^{\gamma}`.
   :math:`\gamma = 0` (KDs CiteULike) gives every group the same share.
3. **Sampling** (every epoch, per user ``u`` and group ``g``). With :math:`\pi_{ug}` the teacher's ranking of
   the group's non-train items, two ranks are drawn independently with :math:`P(r) \propto e^{-r/\mu}` over
   :math:`r < L_{ug} = \min(1000, |\mathcal G_g \setminus \mathcal I_u|)`, redrawn while equal; the better
   ranked item is :math:`i^+`, the other :math:`i^-`: :math:`S_{ug} = \{(i^+, i^-)\}`, :math:`|S_{ug}| = n_g`.
4. **Loss** (the code's ``sample_diff``; :math:`\mathcal L_R` the base loss):

.. math::

    \mathcal L_G = \sum_{(u) \in \text{batch rows}} \frac{1}{|S_u|} \sum_{g} \sum_{(i^+, i^-) \in S_{ug}}
        -\log \sigma\big(\hat y_{u i^+} - \hat y_{u i^-}\big),
    \qquad \mathcal L = \mathcal L_R + \lambda\, \mathcal L_G

Defaults: KDs CiteULike BPR (``configs/citeulike/bpr/unkd.yaml``): :math:`\lambda = 0.5`, ``G = 2``,
``n_distill = 2``, :math:`\gamma = 0`; :math:`\mu = 20` and the 1000-rank cut from the code. As in both codes the
loss is summed over the batch **rows** (a user counts once per interaction in the batch; ``per: user`` sums
unique users instead) and averaged over each user's pairs; ``-logsigmoid`` replaces ``log(σ + 1e-10)``.

**Teacher ranking (our choice).** The code sorts every group's items by the teacher's score for every user
(``[U, I]`` scores). Here the rankings come from the teacher's top-``N`` artifact ``topn`` ``[U, N]`` (best
first, train items excluded by ``rank_teacher``; any train item left is dropped): the group's sub-list of
``topn[u]`` (order kept) gives the first :math:`n_{ug}` ranks of :math:`\pi_{ug}` exactly. A drawn rank
:math:`r \ge n_{ug}` stands for an item below the list: it is drawn uniformly from the group's items that are
neither train items nor in ``topn[u]``, and it is still correctly ordered below any listed item. A pair with
*both* ranks beyond the list cannot be ordered without the teacher and is dropped (weight 0; ``kd/unkd_valid``
reports the kept share). With ``N = 500`` each group usually holds ≥ 100 listed items, and the probability that a
pair falls entirely beyond rank 100 is :math:`e^{-10}`. No teacher lookup is needed during training. Sampling is
vectorised: per group, one ``[U, N]`` pass (chunked over users) with ``cumsum`` + ``searchsorted`` maps ranks to
items, and inverse-CDF draws give the truncated geometric ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, reduce_terms
from rayrec.errors import ConfigError
from rayrec.train.sampling import NegativeSampler


@dataclass
class UnKDConfig:
    """UnKD hyperparameters (paper symbols where it has them; defaults from KDs' CiteULike BPR config)."""

    lambda_unkd: float = 0.5  # λ: weight of L_G against the base loss L_R
    groups: int = 2  # G: popularity groups
    split: Literal["mass", "size"] = "mass"  # mass: equal interaction mass (code); size: equal item counts
    n_distill: int = 2  # n: item pairs per user and epoch, shared out over the groups
    gamma: float = 0.0  # exponent of the inverse-popularity group weights (the code's `lamda`; 0: equal shares)
    mu: float = 20.0  # μ: rank temperature, P(r) ∝ exp(-r / μ) (code: 20)
    max_rank: int = 1000  # ranks drawn from the first max_rank items of each group's ranking (code: 1000)
    per: Literal["row", "user"] = "row"  # row: sum over batch rows (code); user: over unique batch users

    def __post_init__(self) -> None:
        if self.lambda_unkd < 0 or self.gamma < 0:
            raise ConfigError("distill.unkd needs lambda_unkd >= 0 and gamma >= 0")
        if not 1 <= self.groups <= 127:
            raise ConfigError(f"distill.unkd.groups must be in [1, 127], got {self.groups}")
        if self.n_distill < 1 or self.mu <= 0 or self.max_rank < 2:
            raise ConfigError("distill.unkd needs n_distill >= 1, mu > 0, max_rank >= 2")
        if self.split not in ("mass", "size") or self.per not in ("row", "user"):
            raise ConfigError("distill.unkd.split must be mass|size and per row|user")


def popularity_groups(counts: np.ndarray, G: int, split: str = "mass") -> np.ndarray:
    """Group id per item ``[I]`` (0 = most popular; -1 = no train interaction) from train counts ``[I]``."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]  # [I+] popular first
    group = np.full(len(counts), -1, dtype=np.int64)
    if split == "size":
        for g, chunk in enumerate(np.array_split(order, G)):
            group[chunk] = g
        return group
    cum = np.cumsum(counts[order])  # [I+]
    share = cum[-1] / G if len(cum) else 0.0
    start = 0
    for g in range(G - 1):
        if start >= len(order):
            break
        base = cum[start - 1] if start else 0
        over = int(np.searchsorted(cum, base + share, side="right"))  # first item pushing the group over its share
        end = max(over, start + 1)  # a single item heavier than a share forms a group alone
        group[order[start:end]] = g
        start = end
    group[order[start:]] = G - 1  # the rest (the code keeps a large remainder as an extra group)
    return group


def pairs_per_group(counts: np.ndarray, group: np.ndarray, G: int, n: int, gamma: float) -> list[int]:
    """``n_g`` for every group: the code's inverse-popularity weights, ``round(w_g n)``, then +1 for the first
    groups while the total is below ``n``. Empty groups get none."""
    present = [g for g in range(G) if (group == g).any()]
    if not present:
        return [0] * G
    mean = {g: float(counts[group == g].mean()) for g in present}
    hi, lo = max(mean.values()), min(mean.values())
    inv = {g: hi + lo - mean[g] for g in present}
    tot = sum(inv.values())
    ratio = {g: max(round(inv[g] / tot, 2), 0.1) ** gamma for g in present}
    tot = sum(ratio.values())
    n_g = [round(ratio[g] / tot * n) if g in ratio else 0 for g in range(G)]
    short = n - sum(n_g)
    for g in present[:max(short, 0)]:
        n_g[g] += 1
    return n_g


def truncated_geometric(L: Tensor, k: int, mu: float, generator: torch.Generator) -> Tensor:
    r"""``[n, k]`` ranks in ``[0, L_b)`` with :math:`P(r) \propto e^{-r/\mu}` (inverse CDF), ``L`` ``[n]`` >= 1."""
    q = math.exp(-1.0 / mu)
    u = torch.rand(L.shape[0], k, generator=generator, dtype=torch.float64)  # [n, k]
    tail = 1.0 - q ** L.to(torch.float64).unsqueeze(1)  # [n, 1] = 1 - q^L
    r = torch.floor(torch.log1p(-u * tail) / math.log(q)).to(torch.int64)
    return torch.minimum(r.clamp_(min=0), (L - 1).clamp(min=0).unsqueeze(1))


class UnKD(DistillMethod):
    """Unbiased KD over the teacher's top-``N`` lists ``topn`` ``[U, N]`` and the train CSR (see the module
    docstring). ``pos``/``neg`` ``[U, P]`` hold the epoch's pairs, ``valid`` ``[U, P]`` which of them count."""

    name = "unkd"
    needs_ranking = True

    def __init__(self, cfg: UnKDConfig, *, topn: np.ndarray, train_indptr: np.ndarray, train_indices: np.ndarray,
                 num_items: int, chunk: int = 16_384) -> None:
        super().__init__()
        self.cfg = cfg
        self.chunk = chunk
        topn = torch.as_tensor(np.asarray(topn), dtype=torch.int64)  # [U, N]
        U = topn.shape[0]
        if len(train_indptr) != U + 1:
            raise ConfigError(f"distill.unkd: {U} users in the teacher's lists, {len(train_indptr) - 1} in the "
                              "train CSR")
        counts = np.bincount(np.asarray(train_indices), minlength=num_items)[:num_items]  # [I] popularity
        self.item_group = torch.as_tensor(popularity_groups(counts, cfg.groups, cfg.split))  # [I]
        self.n_g = pairs_per_group(counts, self.item_group.numpy(), cfg.groups, cfg.n_distill, cfg.gamma)
        self.group_items = [torch.nonzero(self.item_group == g).flatten() for g in range(cfg.groups)]
        self.train_items = NegativeSampler(train_indptr, train_indices, num_items)  # train membership (searchsorted)
        users = torch.repeat_interleave(torch.arange(U), torch.as_tensor(np.diff(train_indptr)))  # [nnz]
        g_train = self.item_group[torch.as_tensor(np.asarray(train_indices), dtype=torch.int64)]  # [nnz]
        keep = g_train >= 0
        self.train_in_group = torch.bincount(users[keep] * cfg.groups + g_train[keep],
                                             minlength=U * cfg.groups).view(U, cfg.groups)  # [U, G]
        # the group of every listed item, -1 for padding, ungrouped and train items: [U, N] int8, built once
        tg = torch.full(topn.shape, -1, dtype=torch.int8)
        for s in range(0, U, chunk):
            t = topn[s:s + chunk]
            ok = (t >= 0) & ~self.train_items.contains(torch.arange(s, s + t.shape[0]), t.clamp(min=0))
            tg[s:s + chunk] = torch.where(ok, self.item_group[t.clamp(min=0)], -1).to(torch.int8)
        self.topn, self.topn_group = topn, tg
        P = sum(self.n_g)
        self.pos = torch.zeros(U, P, dtype=torch.int64)  # [U, P]
        self.neg = torch.zeros(U, P, dtype=torch.int64)  # [U, P]
        self.valid = torch.zeros(U, P, dtype=torch.bool)  # [U, P] filled by on_epoch_start
        self.unlisted = torch.zeros(U, P, dtype=torch.bool)  # [U, P] negative drawn below the list

    def _unlisted(self, g: int, users: Tensor, topn: Tensor, generator: torch.Generator,
                  max_rounds: int = 100) -> tuple[Tensor, Tensor]:
        """One uniform item of group ``g`` per user ``[n]``, outside its train items and its list ``topn`` ``[n, N]``
        -> ``(items [n], found [n])``."""
        pool = self.group_items[g]
        items = torch.zeros(len(users), dtype=torch.int64)
        todo = torch.arange(len(users))
        for _ in range(max_rounds):
            if len(todo) == 0:
                break
            cand = pool[torch.randint(0, len(pool), (len(todo),), generator=generator)]  # [m]
            in_train = self.train_items.contains(users[todo], cand.unsqueeze(1)).squeeze(1)  # [m]
            bad = in_train | (topn[todo] == cand.unsqueeze(1)).any(dim=1)  # [m] train or listed: redraw
            items[todo[~bad]] = cand[~bad]
            todo = todo[bad]
        found = torch.ones(len(users), dtype=torch.bool)
        found[todo] = False
        return items, found

    def _sample_group(self, g: int, n: int, s: int, e: int, generator: torch.Generator):
        """``n`` pairs of group ``g`` for users ``[s, e)`` -> ``pos, neg, valid, unlisted`` ``[C, n]``."""
        users = torch.arange(s, e)
        topn, listed = self.topn[s:e], self.topn_group[s:e] == g  # [C, N]
        cum = listed.cumsum(dim=1)  # [C, N] listed group items up to each position
        n_list = cum[:, -1]  # [C]
        L = (len(self.group_items[g]) - self.train_in_group[s:e, g]).clamp(max=self.cfg.max_rank)  # [C]
        r1 = truncated_geometric(L, n, self.cfg.mu, generator)  # [C, n]
        r2 = truncated_geometric(L, n, self.cfg.mu, generator)
        can = (L >= 2).unsqueeze(1).expand_as(r1)  # a pair needs two candidates
        for _ in range(100):  # redraw both ranks of equal pairs (the code's rejection)
            tie = (r1 == r2) & can
            if not tie.any():
                break
            rows = tie.nonzero()[:, 0]
            r1[tie] = truncated_geometric(L[rows], 1, self.cfg.mu, generator).squeeze(1)
            r2[tie] = truncated_geometric(L[rows], 1, self.cfg.mu, generator).squeeze(1)
        lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)  # better rank -> positive
        valid = can & (lo != hi) & (lo < n_list.unsqueeze(1))  # both beyond the list: order unknown, dropped

        def at_rank(r: Tensor) -> Tensor:  # listed item of within-group rank r (r < n_list) [C, n]
            idx = torch.searchsorted(cum, (r + 1).clamp(max=cum.shape[1]))  # first position with cum == r + 1
            return topn.gather(1, idx.clamp(max=topn.shape[1] - 1))

        pos = torch.where(valid, at_rank(lo), 0)
        below = valid & (hi >= n_list.unsqueeze(1))  # the negative lies below the list
        neg = torch.where(valid & ~below, at_rank(hi), 0)
        if below.any():
            rows, cols = below.nonzero(as_tuple=True)
            items, found = self._unlisted(g, users[rows], topn[rows], generator)
            neg[rows, cols] = items
            valid[rows[~found], cols[~found]] = False
            below[rows[~found], cols[~found]] = False
        return torch.where(valid, pos, 0), torch.where(valid, neg, 0), valid, below

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Redraw every user's pairs: per group, one vectorised pass per chunk of users."""
        U = self.topn.shape[0]
        col = 0
        for g, n in enumerate(self.n_g):
            if n == 0:
                continue
            for s in range(0, U, self.chunk):
                e = min(s + self.chunk, U)
                pos, neg, valid, below = self._sample_group(g, n, s, e, generator)
                self.pos[s:e, col:col + n], self.neg[s:e, col:col + n] = pos, neg
                self.valid[s:e, col:col + n], self.unlisted[s:e, col:col + n] = valid, below
            col += n

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        if self.cfg.lambda_unkd == 0:
            return {}
        rows = batch.users if self.cfg.per == "row" else batch.uniq_users  # [R]
        r = rows.cpu()
        P = self.pos.shape[1]
        items = torch.cat([self.pos[r], self.neg[r]], dim=1).to(rows.device)  # [R, 2P]
        scores = student.score(rows, items)  # [R, 2P]
        nll = -F.logsigmoid(scores[:, :P] - scores[:, P:])  # [R, P]
        w = self.valid[r].to(device=rows.device, dtype=nll.dtype)  # [R, P]
        per_row = (nll * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # mean over the user's kept pairs
        return {"kd/unkd": self.cfg.lambda_unkd * reduce_terms(per_row, reduction)}

    def epoch_metrics(self) -> dict[str, float]:
        n = max(self.valid.numel(), 1)
        return {"kd/unkd_valid": float(self.valid.sum()) / n, "kd/unkd_unlisted": float(self.unlisted.sum()) / n}
