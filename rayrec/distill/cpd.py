r"""CPD — Distillation with Consistent Preference, MKD's intermediate-layer part (Zhu & Zhang, "From Input to
Output: A Multi-layer Knowledge Distillation Framework for Compressing Recommendation Models", arXiv 2311.04549
v1, 2023; its successor PCKD, "Preference-Consistent Knowledge Distillation for Recommender System", TKDE 2025).
The v1 body is not public: this follows ``../shared/docs/methods/mkd.md`` §5, reconstructed from the authors' code
(``woriazzc/KDs``); every marked choice is configurable.

Feature distillation through a projector :math:`P: D_s \to D_t` lets the projector absorb the teacher's
preferences instead of the student: the student's own scores :math:`r_{ui} = \langle e^S_u, e^S_i \rangle` (what
inference uses) may order items differently from the post-projection scores
:math:`\hat r_{ui} = \langle P_U(e^S_u), P_I(e^S_i) \rangle`. CPD adds regularisers that make the projector keep
the student's order. With :math:`\mathrm{sg}` the stop-gradient:

.. math::

    \mathcal L_{FD} &= \sum_{u} d(e^T_u, P_U(e^S_u)) + \tfrac12\Big(\sum_{i \in pos} + \sum_{j \in neg}\Big)
        d(e^T, P_I(e^S))    && \text{(§5.2)}\\
    \mathcal R_{pair} &= \sum_{(u,i,j)} \max\big(0, -(\hat r_{ui} - \hat r_{uj})(r_{ui} - r_{uj})\big)
        \quad\text{or}\quad \sum -\log\sigma\big((\hat r_{ui} - \hat r_{uj})(r_{ui} - r_{uj})\big) && \text{(§5.3)}\\
    \mathcal R_{list} &= -\sum_{u} \sum_{q \in Q_u} \mathrm{softmax}(r_{u,Q_u}/\tau)_q\,
        \log \mathrm{softmax}(\hat r_{u,Q_u}/\tau)_q   && \text{(§5.3)}\\
    \mathcal L &= \mathcal L_{base} + \lambda_C\big(\mathcal L_{FD} + \alpha\,\mathcal R_{pair} + \beta\,\mathcal R_{list}\big)
        && \text{(§5.5, v1-era)}

where in both regularisers :math:`r` and :math:`\hat r` are computed from :math:`\mathrm{sg}(e^S)` and :math:`r` is
detached: **they update only the projectors** (tested). :math:`Q_u`: ``Q`` items drawn per user and epoch without
replacement from the guide's top-``mxK`` list with :math:`P(\text{rank } r) \propto e^{-r/T}`, kept in rank order
(§5.4; the "items with high preference scores").

Forms (``form``):

- ``v1`` (default; first commit of the authors' code, matching the v1 abstract's "two regularization terms"):
  projector = 5 MLPs ``D_s -> ⌊(D_s+D_t)/2⌋ -> D_t`` averaged and L2-normalised (NKD's), :math:`d` = cosine
  distance :math:`1 - \cos`, both regularisers (``regularizer: both``), hinge pair loss over the batch's BPR
  triples, defaults α = 0.1, β = 1, Q = 20, T = 10, mxK = 500, τ = 5, λ_C = 1 (Foursquare config of 2024-04-15).
- ``pckd`` (later code / TKDE): projector = DE's ``M`` experts with a Gumbel-softmax selection network on the
  teacher representation (temperature annealed exponentially from ``de_tau_start`` to ``de_tau_end``), :math:`d` =
  squared L2; one regulariser (``pair`` | ``list``) or ``hybrid`` (the pair drawn from :math:`Q_u` plus the list
  term; the exact combination of PCKD's eq. 8 is not public).

Pairs for :math:`\mathcal R_{pair}` (``pair_sample``): ``batch`` (the BPR triples of the batch, every negative),
``uniform`` (two random items per user), ``rank`` (the first two items of :math:`Q_u`). Guide ranking (``guide``):
the teacher's top-``mxK`` from the ranking artifact (default; train items excluded there) or the current student's
top-``mxK`` recomputed every epoch (PCKD's pseudo-code).

Monitored: ``kd/cpd_incon`` — the fraction of uniformly random item pairs of the batch users whose order differs
before and after the projectors (``log_incon`` of the code), and ``kd/cpd_incon_top`` — the same over adjacent
pairs of :math:`Q_u` (high-preference items); rank 0's batches of the epoch. Projectors are training-only;
``precision: bf16`` runs their matmuls under bfloat16 autocast (as DE's).
Representations: the model's ``emb`` (BPR's embeddings, LightGCN's propagated ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest, reduce_terms
from rayrec.distill.de import DEConfig, Experts, check_precision, tau_at
from rayrec.distill.lists import rank_discounted
from rayrec.distill.losses import gumbel_softmax
from rayrec.distill.nkd import MeanProjector
from rayrec.errors import ConfigError
from rayrec.models.base import batched_dot


@dataclass
class CPDConfig:
    """CPD hyperparameters (``../shared/docs/methods/mkd.md`` §5.5; defaults: the v1-era code)."""

    lambda_c: float = 1.0  # λ_C
    form: Literal["v1", "pckd"] = "v1"  # projector + feature loss: cosine mean-of-MLPs | DE experts + squared L2
    regularizer: Literal["both", "pair", "list", "hybrid", "none"] = "both"
    alpha: float = 0.1  # α, weight of R_pair
    beta: float = 1.0  # β, weight of R_list
    pair_loss: Literal["hinge", "logsigmoid"] = "hinge"  # v1: hinge; HEAD: -log σ
    pair_sample: Literal["batch", "uniform", "rank"] = "batch"
    Q: int = 20  # list length per user
    T: float = 10.0  # rank-discount temperature of the list sampling
    mxK: int = 500  # the guide's top list the Q items come from
    tau: float = 5.0  # softmax temperature of R_list
    guide: Literal["teacher", "student"] = "teacher"
    experts: int = 5  # projector MLPs (v1: averaged; pckd: DE's M, gated)
    hidden: int = 0  # projector hidden width; 0 = (D_s + D_t) // 2
    item_weight: float = 0.5  # weight of the item terms of L_FD (code: 0.5 · (pos + neg))
    de_tau_start: float = 1.0  # pckd: Gumbel temperature, epoch 0
    de_tau_end: float = 1e-10  # pckd: Gumbel temperature at de_anneal_epochs
    de_anneal_epochs: int = 1000
    precision: Literal["fp32", "bf16"] = "fp32"  # the projectors' matmuls (bf16: autocast, ~2.4x faster on AVX512-BF16)

    def __post_init__(self) -> None:
        if self.lambda_c < 0 or self.alpha < 0 or self.beta < 0 or self.item_weight < 0:
            raise ConfigError("distill.cpd needs lambda_c, alpha, beta, item_weight >= 0")
        if self.Q < 2 or self.mxK < self.Q or self.T <= 0 or self.tau <= 0:
            raise ConfigError(f"distill.cpd needs Q >= 2, mxK >= Q, T > 0, tau > 0 (Q={self.Q}, mxK={self.mxK})")
        if self.experts < 1 or self.hidden < 0:
            raise ConfigError("distill.cpd needs experts >= 1 and hidden >= 0")
        if self.form == "v1" and self.regularizer == "hybrid":
            raise ConfigError("distill.cpd.regularizer=hybrid belongs to form=pckd")
        check_precision(self.precision, "distill.cpd.precision")
        DEConfig(M=self.experts, tau_start=self.de_tau_start, tau_end=self.de_tau_end,
                 anneal_epochs=self.de_anneal_epochs)  # validates the schedule

    @property
    def uses_pair(self) -> bool:
        return self.regularizer in ("both", "pair", "hybrid") and self.alpha > 0

    @property
    def uses_list(self) -> bool:
        return self.regularizer in ("both", "list", "hybrid") and self.beta > 0

    @property
    def needs_lists(self) -> bool:
        return self.uses_list or (self.uses_pair and (self.pair_sample == "rank" or self.regularizer == "hybrid"))


class Projector(nn.Module):
    """``D_s -> D_t``: v1 = mean of MLPs, L2-normalised (ignores ``h_t``); pckd = DE experts selected by a
    Gumbel-softmax over a selection network on the teacher representation ``h_t``."""

    def __init__(self, form: str, experts: int, d_s: int, d_t: int, hidden: int, bf16: bool = False) -> None:
        super().__init__()
        self.form = form
        self.net = (MeanProjector(experts, d_s, d_t, hidden, bf16=bf16) if form == "v1"
                    else Experts(experts, d_s, d_t, hidden, bf16=bf16))

    def forward(self, h_s: Tensor, h_t: Tensor | None, tau: float, generator: torch.Generator | None) -> Tensor:
        """``[n, D_s]`` (and ``[n, D_t]``) -> ``[n, D_t]``."""
        if self.form == "v1":
            return self.net(h_s)
        alpha = torch.softmax(self.net.select(h_t), dim=-1)  # [n, M]
        s = gumbel_softmax(alpha, tau, generator) if self.net.M > 1 else torch.ones_like(alpha)
        return self.net.mixture(h_s, s)

    def distance(self, h_s: Tensor, h_t: Tensor, tau: float, generator: torch.Generator | None) -> Tensor:
        """Per-entity feature loss ``d(h_t, P(h_s))`` -> ``[n]``."""
        p = self(h_s, h_t, tau, generator)
        if self.form == "v1":
            return 1 - (F.normalize(h_t, dim=-1) * p).sum(dim=-1)
        return ((h_t - p) ** 2).sum(dim=-1)


def pair_regularizer(d_hat: Tensor, d: Tensor, kind: str) -> Tensor:
    """Per-pair R_pair for post-projection score differences ``d_hat`` and detached pre-projection ones ``d``."""
    prod = d_hat * d.detach()
    return torch.relu(-prod) if kind == "hinge" else -F.logsigmoid(prod)


def list_regularizer(r_hat: Tensor, r: Tensor, tau: float) -> Tensor:
    """Per-user R_list: CE of softmax(r̂/τ) against the detached softmax(r/τ); ``[B, Q]`` -> ``[B]``."""
    return -(torch.softmax(r.detach() / tau, dim=-1) * F.log_softmax(r_hat / tau, dim=-1)).sum(dim=-1)


class CPD(DistillMethod):
    """Consistent-preference distillation (see the module docstring). ``topn`` ``[U, N]``: the teacher's lists
    (guide ``teacher``; None with guide ``student``, whose lists come from :meth:`set_student_topk`)."""

    name = "cpd"
    needs_teacher = True

    def __init__(self, cfg: CPDConfig, *, student_dim: int, teacher_dim: int, num_items: int,
                 topn: np.ndarray | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        args = (cfg.form, cfg.experts, student_dim, teacher_dim, cfg.hidden, cfg.precision == "bf16")
        self.user_proj, self.item_proj = Projector(*args), Projector(*args)
        self.guide_lists: Tensor | None = None  # [U, N] the guide's ranking
        if cfg.needs_lists and cfg.guide == "teacher":
            if topn is None:
                raise ConfigError("distill.cpd with guide=teacher needs the teacher's ranking (distill.teacher.ranking)")
            self.guide_lists = torch.as_tensor(topn, dtype=torch.int64)
            n_valid = int((self.guide_lists >= 0).sum(1).min())
            if n_valid < cfg.Q:
                raise ConfigError(f"distill.cpd.Q={cfg.Q} but some users have only {n_valid} items in the teacher's "
                                  "lists; lower Q or rank more items")
        self.q_lists: Tensor | None = None  # [U, Q] this epoch's lists, rank order
        self.tau = tau_at(self._de_cfg(), 0)
        self.generator: torch.Generator | None = None
        self._epoch_gen: torch.Generator | None = None
        self._incon = [0.0, 0.0, 0.0, 0.0]  # random pairs: inconsistent, total; top pairs: inconsistent, total

    def _de_cfg(self) -> DEConfig:
        c = self.cfg
        return DEConfig(M=c.experts, tau_start=c.de_tau_start, tau_end=c.de_tau_end, anneal_epochs=c.de_anneal_epochs)

    # ---------------------------------------------------------------- hooks
    def student_topk_request(self) -> tuple[int, bool] | None:
        """``(K, exclude_train)`` of the student ranking needed at each epoch start, else None."""
        if self.cfg.needs_lists and self.cfg.guide == "student":
            return self.cfg.mxK, True
        return None

    def set_student_topk(self, topk: Tensor) -> None:
        """The current student's top-``K`` ``[U, K]`` (called after :meth:`on_epoch_start`); redraws the lists."""
        self.guide_lists = topk[:, : self.cfg.mxK].to(torch.int64)
        self._draw_lists()

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.tau = tau_at(self._de_cfg(), epoch)
        self.generator = generator
        self._epoch_gen = generator
        self._incon = [0.0, 0.0, 0.0, 0.0]
        if self.cfg.needs_lists and self.cfg.guide == "teacher":
            self._draw_lists()

    def _draw_lists(self) -> None:
        U, N = self.guide_lists.shape
        n_valid = int((self.guide_lists >= 0).sum(1).min())
        ranks = rank_discounted(U, min(N, n_valid, self.cfg.mxK), self.cfg.Q, self.cfg.T, self._epoch_gen)
        self.q_lists = self.guide_lists.gather(1, ranks)  # [U, Q] ascending ranks = rank order

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest:
        """Draw this step's pairs (kept on the batch) and ask for the teacher vectors the projectors need."""
        c, g = self.cfg, self.generator
        users = batch.uniq_users
        u_cpu = users.cpu()
        extra = {}
        extra["uniform"] = torch.randint(0, self.num_items, (len(u_cpu), 2), generator=g)  # [U_b, 2] metric pairs
        if self.q_lists is not None:
            extra["q"] = self.q_lists[u_cpu]  # [U_b, Q]
            if c.regularizer == "hybrid":
                pos = torch.rand(len(u_cpu), c.Q, generator=g).topk(2, dim=1).indices.sort(dim=1).values
                extra["hybrid"] = extra["q"].gather(1, pos)  # [U_b, 2] two items of Q_u, rank order
        dev = users.device
        batch.extras["cpd"] = {k: v.to(dev) for k, v in extra.items()}
        items = [batch.uniq_pos, batch.uniq_neg]
        if c.form == "pckd":  # the DE projector's selection reads the teacher vector of every projected item
            more = torch.cat([*(v.reshape(-1) for v in batch.extras["cpd"].values()), batch.uniq_pos, batch.uniq_neg])
            batch.extras["cpd_items"] = torch.unique(more)
            items.append(batch.extras["cpd_items"])
        return TeacherRequest(users=users, items=torch.cat(items))

    # ---------------------------------------------------------------- loss
    def _project_items(self, student: nn.Module, groups: list[Tensor], t_lookup) -> list[tuple[Tensor, Tensor]]:
        """Detached student vectors and their projections for each item tensor of ``groups`` (``[n, C]`` ->
        ``[n, C, D_s]``, ``[n, C, D_t]``), all groups in one projector call.

        v1's projection is a function of the item alone: each distinct item of all the groups is projected once and
        the rows are gathered (a batch's positives, negatives and list items overlap, and the lists of its users
        share many of the teacher's top items; same values, fewer GEMM rows). pckd draws Gumbel noise per
        occurrence, so every occurrence is projected."""
        flat = torch.cat([g.reshape(-1) for g in groups])
        if self.cfg.form == "v1":
            uniq, inv = torch.unique(flat, return_inverse=True)
            e = student.item_repr(uniq)["emb"].detach()  # sg(e^S) [I_u, D_s]
            p = self.item_proj(e, None, self.tau, self.generator)  # [I_u, D_t]
            e, p = e[inv], p[inv]
        else:
            e = student.item_repr(flat)["emb"].detach()
            p = self.item_proj(e, t_lookup(flat), self.tau, self.generator)
        sizes = [g.numel() for g in groups]
        return [(ei.view(*g.shape, -1), pi.view(*g.shape, -1))
                for g, ei, pi in zip(groups, e.split(sizes), p.split(sizes))]

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        c = self.cfg
        if c.lambda_c == 0:
            return {}
        users = batch.uniq_users
        n_pos, n_neg = batch.uniq_pos.shape[0], batch.uniq_neg.shape[0]
        t_user = teacher.user["emb"].detach().float()  # [U_b, D_t]
        t_item = teacher.item["emb"].detach().float()  # [I_p + I_n (+ extra), D_t]
        ex = batch.extras["cpd"]

        def t_lookup(ids: Tensor) -> Tensor:  # teacher vectors of the extra items (pckd), by id
            pool = batch.extras["cpd_items"]
            return t_item[n_pos + n_neg + torch.searchsorted(pool, ids)]

        # L_FD on the unique batch entities (gradients reach the student and the projectors)
        s_user = student.user_repr(users)["emb"]  # [U_b, D_s]
        s_item = student.item_repr(torch.cat([batch.uniq_pos, batch.uniq_neg]))["emb"]  # [I_p + I_n, D_s]
        lu = self.user_proj.distance(s_user, t_user, self.tau, self.generator)
        li = self.item_proj.distance(s_item, t_item[: n_pos + n_neg], self.tau, self.generator)
        fd = reduce_terms(lu, reduction) + c.item_weight * (
            reduce_terms(li[:n_pos], reduction) + reduce_terms(li[n_pos:], reduction))
        out = {"kd/cpd_fd": c.lambda_c * fd}

        # regularisers: student side detached -> only the projectors learn from them
        e_u = s_user.detach()
        p_u = self.user_proj(e_u, t_user, self.tau, self.generator)  # [U_b, D_t]

        def scores(e_i: Tensor, p_i: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
            """Items ``[U_b, C, D]`` (or ``[B, C, D]`` with ``rows`` ``[B]`` -> unique users) -> r, r̂ ``[., C]``."""
            eu, pu = (e_u, p_u) if rows is None else (e_u[rows], p_u[rows])
            return batched_dot(eu, e_i), batched_dot(pu, p_i)

        groups: dict[str, Tensor] = {}  # the item sets the regularisers compare, projected together
        pair_rows = None
        if c.uses_pair:
            if c.regularizer == "hybrid" or c.pair_sample != "batch":
                groups["pair"] = ex["hybrid"] if c.regularizer == "hybrid" else (
                    ex["q"][:, :2] if c.pair_sample == "rank" else ex["uniform"])  # [U_b, 2]
            else:  # the batch's BPR triples (u, i+, j-), every negative
                pair_rows = torch.searchsorted(users, batch.users)  # [B] rows -> unique users
                groups["pair"] = torch.cat([batch.pos.unsqueeze(1), batch.neg], dim=1)  # [B, 1 + N]
        if c.uses_list:
            groups["list"] = ex["q"]  # [U_b, Q]
        projected = dict(zip(groups, self._project_items(student, list(groups.values()), t_lookup))) if groups else {}
        if c.uses_pair:
            r, r_hat = scores(*projected["pair"], pair_rows)  # [U_b, 2] or [B, 1 + N]
            rp = pair_regularizer(r_hat[:, :1] - r_hat[:, 1:], r[:, :1] - r[:, 1:], c.pair_loss).sum(1)
            out["kd/cpd_pair"] = c.lambda_c * c.alpha * reduce_terms(rp, reduction)
        if c.uses_list:
            r, r_hat = scores(*projected["list"])  # [U_b, Q]
            out["kd/cpd_list"] = c.lambda_c * c.beta * reduce_terms(list_regularizer(r_hat, r, c.tau), reduction)
            self._count(r_hat[:, :-1] - r_hat[:, 1:], r[:, :-1] - r[:, 1:], top=True)
        with torch.no_grad():
            r, r_hat = scores(*self._project_items(student, [ex["uniform"]], t_lookup)[0])
            self._count(r_hat[:, :1] - r_hat[:, 1:], r[:, :1] - r[:, 1:], top=False)
        return out

    def _count(self, d_hat: Tensor, d: Tensor, top: bool) -> None:
        bad = float((torch.sign(d_hat.detach()) != torch.sign(d.detach())).sum())
        i = 2 if top else 0
        self._incon[i] += bad
        self._incon[i + 1] += d.numel()

    def inconsistency(self) -> dict[str, float]:
        """This epoch's preference-inconsistency rates so far (random pairs; adjacent pairs of the lists)."""
        out = {}
        if self._incon[1]:
            out["kd/cpd_incon"] = self._incon[0] / self._incon[1]
        if self._incon[3]:
            out["kd/cpd_incon_top"] = self._incon[2] / self._incon[3]
        return out

    def epoch_metrics(self) -> dict[str, float]:
        out = self.inconsistency()
        if self.cfg.form == "pckd":
            out["kd/cpd_tau"] = self.tau
        return out
