r"""HTD / FTD — Hierarchical and Full Topology Distillation (Kang, Hwang, Kweon & Yu, "Topology Distillation for
Recommender System", KDD 2021; official code ``SeongKu-Kang/Topology_Distillation_KDD21``, ``model.py``; also
re-implemented as ``HTD`` in ``woriazzc/KDs``, ``modeling/KD/cf/baseline.py``).

The paper's body could not be read here, so no equation numbers are given: the formulas below are restated from
the official code (``FTD.get_TD_loss``, ``HTD.get_GA_loss``, ``HTD.get_TD_loss2``) and agree with the paper's
notation as summarised elsewhere (topology :math:`A`, cosine :math:`\rho`, selection network :math:`v`).

**Topology.** The entities of a batch are its unique users and unique items (positives and negatives together,
deduplicated), ``E = U_b + I_b`` of them. Their *topology* in a space is the matrix of pairwise cosine
similarities :math:`A_{ij} = \rho(h_i, h_j) = \langle h_i, h_j\rangle / (\lVert h_i\rVert \lVert h_j\rVert)`, built
from the teacher's representations (:math:`A^t`) and from the student's own (:math:`A^s`, no projection: cosines
are comparable across dimensions).

**FTD** (``mode: ftd``) transfers the full topology:

.. math:: \mathcal L_{FTD} = \lVert A^s - A^t \rVert_F^2 = \sum_{i, j \in E} \big(\rho(s_i, s_j) - \rho(t_i, t_j)\big)^2

**HTD** (``mode: htd``) decomposes it with ``M`` groups per side. Group assignment is DE's machinery
(:class:`rayrec.distill.de.Experts`): a selection network :math:`v` gives :math:`\alpha_e = \mathrm{softmax}(v(t_e))`
and ``M`` experts :math:`f_m` map the student to the teacher space with Gumbel-softmax weights :math:`z_e`:

.. math:: \mathcal L_{GA} = \sum_{e \in E} \Big\lVert t_e - \sum_m z_{e,m} f_m(s_e) \Big\rVert_2^2,\qquad
          z_e = \mathrm{softmax}\big((\log(\alpha_e + 10^{-10}) + g) / \tau\big)

The topology uses the *hard* groups :math:`k(e) = \arg\max_m \alpha_{e,m}` (no gradient); users take groups
``0..M-1`` and items ``M..2M-1``, so a user and an item never share a group. With group prototypes (means)
:math:`p_k = \frac{1}{|G_k|}\sum_{e \in G_k} h_e` in each space (computed without gradient, as in the code):

.. math::

    \mathcal L_{entity} &= \sum_{k} \sum_{i, j \in G_k} \big(\rho(s_i, s_j) - \rho(t_i, t_j)\big)^2
        && \text{(within each group)}\\
    \mathcal L_{group} &= \sum_{k \in K_b} \sum_{e \in E} \big(\rho(p^s_k, s_e) - \rho(p^t_k, t_e)\big)^2
        && \text{(prototype to entity, choice ``second'')}\\
    \mathcal L_{HTD} &= \alpha\,(\mathcal L_{entity} + \mathcal L_{group}) + (1 - \alpha)\,\mathcal L_{GA},
        \qquad \mathcal L = \mathcal L_{base} + \lambda\,\mathcal L_{HTD}

(:math:`K_b` the groups present in the batch). Choice ``first`` uses prototype-to-prototype similarities
:math:`\rho(p^s_k, p^s_l)` instead; since the prototypes carry no gradient it only adds a constant, exactly as
in the code (``prototype_grad: true`` lets gradients flow through the student's prototypes instead).

Defaults: ``woriazzc/KDs`` CiteULike BPR (``configs/citeulike/bpr/htd.yaml``): :math:`\lambda = 0.5`,
:math:`\alpha = 0.9`, ``M = 30``, choice ``second``, 1000 epochs; the Gumbel temperature anneals exponentially
from 1 to :math:`10^{-10}` over the run (KDs ``do_something_in_each_epoch``; here :func:`rayrec.distill.de.tau_at`
with DE's one-epoch offset). The official notebook uses :math:`\lambda = 10^{-3}`, :math:`\alpha = 0.5` and a
constant :math:`\tau = 0.1` (``schedule: constant``, ``tau_start: 0.1``).

Code details kept (each configurable): the entity-level pairs are those of one group whose *teacher* cosine is
positive (``entity_pairs: positive``; the code selects them with ``(A^t \odot mask) > 0``, which also drops
same-group pairs with a negative teacher cosine; ``all`` keeps every same-group pair); both orders ``(i, j)`` and
``(j, i)`` and the diagonal (zero) are summed; :math:`\mathcal L_{GA}` sums users and items with weight 1 (DE uses
½ for items). Cosines use ``F.normalize`` (eps 1e-12) where the code divides by the raw norm.

NeuMF (not in the official code): as DE, one HTD per representation part (GMF, MLP) summed, or ``concat``.

Loss scale: sums, as in the code; with ``mean`` each sum is divided by its number of terms.

Cost: HTD's entity level builds one ``[G_k, G_k]`` cosine block per group (the code builds the whole ``[U_b, U_b]``
and ``[I_b, I_b]`` matrices and masks them: the same terms, ~M times the FLOPs with balanced groups); FTD builds the
whole ``[E, E]``. :math:`\mathcal L_{GA}` computes, as DE does, only the experts whose Gumbel weight is
``>= skip_below`` (1e-6) once the annealed selection is nearly one-hot (``skip_below: 0``: always all ``M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest, reduce_terms
from rayrec.distill.de import Experts, check_precision, tau_at
from rayrec.errors import ConfigError


@dataclass
class HTDConfig:
    """HTD/FTD hyperparameters (paper symbols; defaults from KDs' CiteULike BPR config)."""

    mode: Literal["htd", "ftd"] = "htd"
    lambda_htd: float = 0.5  # λ: weight of L_HTD (or L_FTD) against the base loss
    alpha: float = 0.9  # α: L_TD weight; (1 - α) weighs L_GA (HTD only)
    M: int = 30  # experts = groups per side (HTD only)
    choice: Literal["second", "first"] = "second"  # group level: prototype-entity (P, e) or prototype-prototype (P, P)
    entity_pairs: Literal["positive", "all"] = "positive"  # positive: same group and teacher cosine > 0 (code)
    prototype_grad: bool = False  # False: prototypes without gradient (code)
    tau_start: float = 1.0  # τ₀ of the Gumbel-softmax
    tau_end: float = 1e-10  # τ_end
    anneal_epochs: int = 1000  # epochs from τ₀ to τ_end (KDs: the run's epochs)
    schedule: Literal["exponential", "linear", "constant"] = "exponential"
    hidden: int = 0  # expert hidden width; 0 = (D_s + D_t) // 2
    skip_below: float = 1e-6  # L_GA: experts whose Gumbel weight is below this are skipped (0: always all M), as DE's
    neumf_parts: Literal["separate", "concat"] = "separate"
    precision: Literal["fp32", "bf16"] = "fp32"  # the experts' matmuls (bf16: autocast, as DE's)

    def __post_init__(self) -> None:
        if self.mode not in ("htd", "ftd"):
            raise ConfigError(f"distill.htd.mode must be htd or ftd, got {self.mode!r}")
        if self.choice not in ("second", "first") or self.entity_pairs not in ("positive", "all"):
            raise ConfigError("distill.htd.choice must be second|first and entity_pairs positive|all")
        if self.lambda_htd < 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.htd needs lambda_htd >= 0 and 0 <= alpha <= 1, got {self.lambda_htd}, "
                              f"{self.alpha}")
        if not 0 <= self.skip_below < 1:
            raise ConfigError(f"distill.htd.skip_below must be in [0, 1), got {self.skip_below}")
        if self.M < 1 or self.hidden < 0 or self.anneal_epochs < 1:
            raise ConfigError("distill.htd needs M >= 1, hidden >= 0, anneal_epochs >= 1")
        check_precision(self.precision, "distill.htd.precision")
        if not (0 < self.tau_end <= self.tau_start):
            raise ConfigError(f"distill.htd needs 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities ``ρ(a_i, b_j)``: ``[n, D]``, ``[m, D]`` -> ``[n, m]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def full_topology_terms(s: Tensor, t: Tensor) -> Tensor:
    r"""FTD's squared differences :math:`(\rho(s_i, s_j) - \rho(t_i, t_j))^2` over all pairs -> ``[E·E]``."""
    return (cosine_matrix(s, s) - cosine_matrix(t, t)).pow(2).flatten()


def entity_topology_terms(s: Tensor, t: Tensor, z: Tensor, entity_pairs: str = "positive") -> Tensor:
    r"""HTD's entity level: :math:`(\rho(s_i, s_j) - \rho(t_i, t_j))^2` for the pairs of one group -> ``[P]``.

    ``s`` ``[n, D_s]``, ``t`` ``[n, D_t]``, ``z`` ``[n]`` group ids. ``positive`` keeps only pairs whose teacher
    cosine is > 0 (the code's selection); ``all`` keeps every same-group pair (diagonal included, it adds 0).
    """
    # one [G_k, G_k] block per group instead of the [n, n] matrix and its mask: Σ_k G_k² of the n² cosines (~M times
    # fewer with balanced groups), the same terms in a different order
    order = torch.argsort(z, stable=True)
    sizes = torch.bincount(z)
    sizes = sizes[sizes > 0].tolist()  # G_k, in group order
    terms = []
    for s_k, t_k in zip(F.normalize(s[order], dim=-1).split(sizes), F.normalize(t[order], dim=-1).split(sizes)):
        a_t = t_k @ t_k.T  # [G_k, G_k]
        d = (s_k @ s_k.T - a_t).pow(2)
        terms.append(d[a_t > 0] if entity_pairs == "positive" else d.flatten())
    return torch.cat(terms) if terms else s.new_zeros(0)


def group_topology_terms(s: Tensor, t: Tensor, z: Tensor, n_groups: int, choice: str = "second",
                         prototype_grad: bool = False) -> Tensor:
    r"""HTD's group level: prototypes :math:`p_k` (group means, ``n_groups`` possible ids, those present kept) and
    :math:`(\rho(p^s_k, x^s) - \rho(p^t_k, x^t))^2` with ``x`` every entity (``second``) or every prototype
    (``first``) -> ``[K_b·n]`` or ``[K_b·K_b]``."""
    present = torch.unique(z)  # [K_b]
    count = torch.bincount(z, minlength=n_groups).to(s.dtype)[present].unsqueeze(1)  # [K_b, 1]

    def prototypes(h: Tensor, grad: bool) -> Tensor:
        h = h if grad else h.detach()
        return h.new_zeros(n_groups, h.shape[1]).index_add(0, z, h)[present] / count  # [K_b, D]

    p_s, p_t = prototypes(s, prototype_grad), prototypes(t, False)
    if choice == "first":
        return (cosine_matrix(p_s, p_s) - cosine_matrix(p_t, p_t)).pow(2).flatten()  # [K_b·K_b]
    return (cosine_matrix(p_s, s) - cosine_matrix(p_t, t)).pow(2).flatten()  # [K_b·n]


class HTD(DistillMethod):
    """Hierarchical (or full) topology distillation (see the module docstring). ``parts``: representation names,
    ``["emb"]`` (BPR, LightGCN) or ``["gmf", "mlp"]`` (NeuMF, separate), ``["concat"]`` (NeuMF, concatenated)."""

    name = "htd"
    needs_teacher = True

    def __init__(self, cfg: HTDConfig, *, student_dim: int, teacher_dim: int, parts: list[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.parts = parts
        self.concat = parts == ["concat"]
        w = 2 if self.concat else 1
        if cfg.mode == "htd":  # FTD has no parameters
            args = (cfg.M, w * student_dim, w * teacher_dim, cfg.hidden, cfg.precision == "bf16")
            self.users = nn.ModuleDict({p: Experts(*args) for p in parts})
            self.items = nn.ModuleDict({p: Experts(*args) for p in parts})
            if cfg.alpha == 1:  # no L_GA: the selection networks only assign (random, fixed) groups; nothing trains
                self.requires_grad_(False)  # (and DDP sees no unused trainable parameters)
        self.tau = tau_at(cfg, 0)  # tau_at reads only the schedule fields, shared with DEConfig
        self.generator: torch.Generator | None = None

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.tau = tau_at(self.cfg, epoch)
        self.generator = generator

    @staticmethod
    def batch_items(batch: DistillBatch) -> Tensor:
        """The batch's unique items, positives and negatives together ``[I_b]`` (the code's ``unique(pos ∪ neg)``)."""
        return torch.unique(torch.cat([batch.uniq_pos, batch.uniq_neg]))

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest:
        items = self.batch_items(batch)
        batch.extras["htd"] = items
        return TeacherRequest(users=batch.uniq_users, items=items)

    def _reprs(self, reprs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.concat:
            return {"concat": torch.cat([reprs["gmf"], reprs["mlp"]], dim=-1)}
        return reprs

    def _htd(self, p: str, su: Tensor, si: Tensor, tu: Tensor, ti: Tensor, reduction: str) -> Tensor:
        """α L_TD + (1 − α) L_GA of one representation part."""
        c, M = self.cfg, self.cfg.M
        total = su.new_zeros(())
        if c.alpha > 0:
            with torch.no_grad():  # hard groups from the teacher: users 0..M-1, items M..2M-1
                zu = self.users[p].select(tu).argmax(dim=-1)  # [U_b]
                zi = self.items[p].select(ti).argmax(dim=-1) + M  # [I_b]
            entity = torch.cat([entity_topology_terms(su, tu, zu, c.entity_pairs),
                                entity_topology_terms(si, ti, zi, c.entity_pairs)])  # users never pair with items
            group = group_topology_terms(torch.cat([su, si]), torch.cat([tu, ti]), torch.cat([zu, zi]), 2 * M,
                                         c.choice, c.prototype_grad)
            total = total + c.alpha * (reduce_terms(entity, reduction) + reduce_terms(group, reduction))
        if c.alpha < 1:
            lu = self.users[p](su, tu, self.tau, self.generator, c.skip_below)  # [U_b]
            li = self.items[p](si, ti, self.tau, self.generator, c.skip_below)  # [I_b]
            total = total + (1 - c.alpha) * (reduce_terms(lu, reduction) + reduce_terms(li, reduction))
        return total

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        if self.cfg.lambda_htd == 0:
            return {}
        users = batch.uniq_users
        items = batch.extras["htd"] if "htd" in batch.extras else self.batch_items(batch)
        s_user, s_item = self._reprs(student.user_repr(users)), self._reprs(student.item_repr(items))
        # the teacher's side never receives gradients, whatever the caller passes
        t_user = {k: v.detach() for k, v in self._reprs(teacher.user).items()}
        t_item = {k: v.detach() for k, v in self._reprs(teacher.item).items()}
        total = 0.0
        for p in self.parts:
            su, si = s_user[p], s_item[p]  # [U_b, D_s], [I_b, D_s]
            tu, ti = t_user[p].to(su.dtype), t_item[p].to(si.dtype)  # [U_b, D_t], [I_b, D_t]
            if self.cfg.mode == "ftd":
                total = total + reduce_terms(full_topology_terms(torch.cat([su, si]), torch.cat([tu, ti])), reduction)
            else:
                total = total + self._htd(p, su, si, tu, ti, reduction)
        return {f"kd/{self.cfg.mode}": self.cfg.lambda_htd * total}

    def epoch_metrics(self) -> dict[str, float]:
        return {"kd/tau": self.tau} if self.cfg.mode == "htd" else {}
