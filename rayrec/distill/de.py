r"""DE — Distillation Experts (Kang et al., "DE-RRD: A Knowledge Distillation Framework for Recommender System",
CIKM 2020, §3.2; official code ``SeongKu-Kang/DE-RRD_CIKM20``, ``Models/DE.py``).

DE distills the teacher's user and item **representations** through ``M`` experts and a selection network per
side (users, items). For an entity ``e`` with teacher representation :math:`h_t(e)` and student representation
:math:`h_s(e)`:

.. math::

    \alpha(e) &= \mathrm{softmax}(W_{sel} h_t(e) + b_{sel}) \in \Delta^M            && \text{(selection network)}\\
    s(e) &= \mathrm{softmax}\big((\log(\alpha + 10^{-10}) + g) / \tau\big),\ g_m \sim \mathrm{Gumbel}(0, 1)
         && \text{(Gumbel-softmax, soft)}\\
    \hat h(e) &= \sum_m s_m(e)\, E_m(h_s(e)),\quad E_m = \mathrm{Linear}(D_s \to \lfloor (D_s + D_t)/2 \rfloor)
         \to \mathrm{ReLU} \to \mathrm{Linear}(\cdot \to D_t)\\
    \mathcal L_{DE}(e) &= \lVert h_t(e) - \hat h(e) \rVert_2^2     && \text{(squared, as in the code)}

Batch loss (code ``run.py: LOO_DE_run``): unique batch users, plus half of the unique positive and the unique
negative items:

.. math:: \mathcal L_{DE} = \sum_{u} \mathcal L_{DE}(u) + \tfrac12\Big(\sum_{i \in pos} \mathcal L_{DE}(i)
          + \sum_{j \in neg} \mathcal L_{DE}(j)\Big),\qquad \mathcal L = \mathcal L_{base} + \lambda_{DE}\mathcal L_{DE}

with :math:`\lambda_{DE} = 0.01` and ``M = 30`` (code defaults). Temperature: exponential annealing from
:math:`\tau_0 = 1` to :math:`\tau_{end} = 10^{-10}` over ``anneal_epochs`` (1000 = the code's ``max_epoch``): the
value used during epoch ``e`` is :math:`\tau_0 (\tau_{end}/\tau_0)^{\max(e-1, 0)/E}` floored at
:math:`\tau_{end}` (the code updates τ after each epoch, so epochs 0 and 1 both use τ₀). ``linear`` and
``constant`` schedules are options.

All ``M`` experts run as two plain GEMMs (``[B, M·H]``), not ``M`` separate calls; once the annealed selection is
one-hot for most entities, only the experts with a weight ``>= skip_below`` (1e-6) are computed, grouped by expert
(:meth:`ExpertMLPs.mixture`): the late epochs cost about one expert per entity instead of ``M``. ``precision: bf16``
runs the experts' matmuls and hidden layer in bfloat16 (autocast; selection, weights and loss in float32): ~2.5x
faster per step on a CPU with AVX512-BF16 (one thread, 2000 entities, M = 30, 20 -> 200, forward and backward of the
dense mixture: 180 -> 72 ms); the default ``fp32`` is the paper's.

NeuMF (not in the official code): the teacher and the student each have a GMF and an MLP representation; by
default (``neumf_parts: separate``) DE runs one expert set + selection network per part and side (GMF users,
GMF items, MLP users, MLP items), summing their losses — the choice of the only public NeuMF implementation
(HyperKDMA). ``concat`` distills the concatenation ``[GMF; MLP]`` with one set per side instead.

Loss scale: sums, as in the code (``train.loss_reduction=sum`` keeps :math:`\lambda_{DE}`'s meaning); with
``mean`` each entity group is averaged instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest, reduce_terms
from rayrec.distill.losses import gumbel_softmax
from rayrec.errors import ConfigError


@dataclass
class DEConfig:
    """DE hyperparameters (paper symbols; defaults from the official code)."""

    M: int = 30  # experts per side
    lambda_de: float = 0.01  # λ_DE
    tau_start: float = 1.0  # τ₀
    tau_end: float = 1e-10  # τ_end
    anneal_epochs: int = 1000  # epochs from τ₀ to τ_end (the code's max_epoch)
    schedule: Literal["exponential", "linear", "constant"] = "exponential"
    hidden: int = 0  # expert hidden width; 0 = (D_s + D_t) // 2 (D_s // 2 when D_s == D_t)
    item_weight: float = 0.5  # weight of the item terms (code: 0.5 · (pos + neg))
    neumf_parts: Literal["separate", "concat"] = "separate"
    skip_below: float = 1e-6  # experts whose Gumbel weight is below this are skipped (0: always all M)
    precision: Literal["fp32", "bf16"] = "fp32"  # the experts' matmuls (bf16: autocast, ~2.3x faster on AVX512-BF16)

    def __post_init__(self) -> None:
        if not 0 <= self.skip_below < 1:
            raise ConfigError(f"distill.de.skip_below must be in [0, 1), got {self.skip_below}")
        if self.M < 1:
            raise ConfigError(f"distill.de.M must be >= 1, got {self.M}")
        if self.lambda_de < 0 or self.item_weight < 0:
            raise ConfigError("distill.de.lambda_de and item_weight must be >= 0")
        if not (0 < self.tau_end <= self.tau_start):
            raise ConfigError(f"distill.de needs 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")
        if self.anneal_epochs < 1 or self.hidden < 0:
            raise ConfigError("distill.de.anneal_epochs must be >= 1 and hidden >= 0")
        check_precision(self.precision, "distill.de.precision")


def check_precision(value: str, key: str) -> None:
    """``precision`` of the expert/projector matmuls: ``fp32`` (the papers') or ``bf16`` (autocast)."""
    if value not in ("fp32", "bf16"):
        raise ConfigError(f"{key} must be fp32 or bf16, got {value!r}")


def tau_at(cfg: DEConfig, epoch: int) -> float:
    """The Gumbel temperature used during ``epoch`` (0-based)."""
    t = min(max(epoch - 1, 0) / cfg.anneal_epochs, 1.0)
    if cfg.schedule == "constant":
        return cfg.tau_start
    if cfg.schedule == "linear":
        return max(cfg.tau_start + (cfg.tau_end - cfg.tau_start) * t, cfg.tau_end)
    return max(cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** t, cfg.tau_end)


class ExpertMLPs(nn.Module):
    """``M`` two-layer MLPs ``D_s -> H -> D_t`` (ReLU) evaluated together as batched matmuls; ``dropout`` before
    each layer (0: none). ``bf16``: their matmuls and hidden layer in bfloat16 (autocast; parameters, inputs and
    the float32 output unchanged; the callers' config key ``precision: bf16``)."""

    def __init__(self, M: int, d_s: int, d_t: int, hidden: int = 0, dropout: float = 0.0, bf16: bool = False) -> None:
        super().__init__()
        self.bf16 = bf16
        h = hidden or ((d_s + d_t) // 2 if d_s != d_t else max(d_s // 2, 1))
        self.M, self.d_t = M, d_t
        self.w1 = nn.Parameter(torch.empty(M, d_s, h))
        self.b1 = nn.Parameter(torch.empty(M, h))
        self.w2 = nn.Parameter(torch.empty(M, h, d_t))
        self.b2 = nn.Parameter(torch.empty(M, d_t))
        for w, b, fan_in in ((self.w1, self.b1, d_s), (self.w2, self.b2, h)):  # nn.Linear's default init
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.evaluations = 0  # (entity, expert) pairs run through the experts by mixture() so far

    def flop_per_evaluation(self) -> int:
        """Forward and backward FLOPs of one (entity, expert) pair: ``2 (D_s H + H D_t)`` forward, twice that for the
        gradients wrt the weights and the input (the student's vector)."""
        _, d_s, H = self.w1.shape
        return 3 * 2 * (d_s * H + H * self.d_t)

    def expert_outputs(self, h_s: Tensor) -> Tensor:
        """``[B, D_s]`` -> every expert's output ``[B, M, D_t]`` (for inspection; training uses :meth:`mixture`)."""
        x = torch.relu(torch.einsum("bd,mdh->bmh", self.drop(h_s), self.w1) + self.b1)  # [B, M, H]
        return torch.einsum("bmh,mht->bmt", self.drop(x), self.w2) + self.b2  # [B, M, D_t]

    def mixture(self, h_s: Tensor, s: Tensor, skip_below: float = 0.0) -> Tensor:
        """``Σ_m s_m E_m(h_s)`` for weights ``s`` ``[B, M]`` -> ``[B, D_t]``.

        Dense path: two plain GEMMs, ``relu(h W1) [B, M·H]`` scaled per expert, times the stacked second layers
        ``[M·H, D_t]``; the ``[B, M, D_t]`` block of expert outputs is never built (same FLOPs, ~3x faster on CPU
        than batched bmm). Sparse path (``skip_below > 0`` and at most a fifth of the weights above it, e.g. a
        Gumbel-softmax late in DE's annealing, when the selection is one-hot to machine precision): only the
        (entity, expert) pairs with ``s_m >= skip_below`` are computed, grouped by expert (on CPU two grouped
        GEMMs, :func:`_grouped_experts`; other CPUs one small GEMM pair per used expert), up to ``M`` times fewer
        FLOPs; CPU only (on a GPU the dense path is faster). (HTD's step, M 30, ~2000 items, bf16, per-expert GEMMs:
        the sparse path beats the dense one below ~0.2 of the pairs kept; at 0.04 the step is 86 against 156 ms, at
        0.22 199 against 170.)
        Dropped terms weigh less than ``skip_below`` each (as do their gradients to the selection network, which are
        proportional to ``s_m``). Returns float32."""
        with torch.autocast(h_s.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._mixture(h_s, s, skip_below).float()

    def mean(self, h_s: Tensor) -> Tensor:
        """``(1/M) Σ_m E_m(h_s)``: :meth:`mixture` with equal weights, without the per-expert scaling (the ``1/M``
        folded into the stacked second layers, ``[M·H, D_t]``; equal up to rounding). ``[B, D_s]`` -> ``[B, D_t]``
        float32."""
        M, _, H = self.w1.shape
        with torch.autocast(h_s.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self._hidden(h_s)  # [B, M·H]
            return (x @ (self.w2.reshape(M * H, -1) / M) + self.b2.mean(0)).float()  # [B, D_t]

    def _hidden(self, h_s: Tensor) -> Tensor:
        """Every expert's hidden layer in one GEMM, dropout applied: ``[B, D_s]`` -> ``[B, M·H]``."""
        M, d_s, H = self.w1.shape
        x = self.drop(h_s) @ self.w1.permute(1, 0, 2).reshape(d_s, M * H)  # bf16 under autocast
        # the bias in x's dtype: with bf16 the [B, M·H] elementwise work (bias, ReLU, the mixture's scaling and
        # their backward) stays in bf16 instead of promoting to float32, ~30% of a DE step (M 30, B 2000)
        return self.drop(torch.relu(x + self.b1.reshape(1, M * H).to(x.dtype)))

    def _mixture(self, h_s: Tensor, s: Tensor, skip_below: float) -> Tensor:
        M, _, H = self.w1.shape
        # the sparse path on the CPU only: on a GPU the dense GEMMs cost less than the per-expert launches and the
        # host syncs it needs (H100, CiteULike, plain loop: de_late's one-hot epoch 2.32 s sparse, dense DE 0.53 s)
        if skip_below > 0 and h_s.device.type == "cpu":
            keep = s.detach() >= skip_below  # [B, M]
            kept = int(keep.sum())
            if kept * 5 <= keep.numel():  # below ~1/5 of the pairs the per-expert GEMMs cost more
                self.evaluations += kept
                return self._sparse_mixture(h_s, s, keep)
        self.evaluations += h_s.shape[0] * M
        x = self._hidden(h_s)
        x = (x.view(-1, M, H) * s.to(x.dtype).unsqueeze(-1)).reshape(-1, M * H)  # [B, M·H]
        return x @ self.w2.reshape(M * H, -1) + s @ self.b2  # [B, D_t]

    def _sparse_mixture(self, h_s: Tensor, s: Tensor, keep: Tensor) -> Tensor:
        b, m = keep.nonzero(as_tuple=True)  # [P] pairs, grouped by entity
        order = torch.argsort(m, stable=True)
        b, m = b[order], m[order]  # grouped by expert
        counts = torch.bincount(m, minlength=self.M).tolist()
        # one gather of the pairs' inputs and weights, the parameters cast once (bf16 under autocast), then per used
        # expert only its two GEMMs on a contiguous slice; one scaling and one scatter at the end
        dt = torch.get_autocast_dtype(h_s.device.type) if torch.is_autocast_enabled(h_s.device.type) else h_s.dtype
        w1, b1, w2, b2 = (p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2))
        h = self.drop(h_s)[b].to(dt)  # [P, D_s]
        if h.device.type == "cpu" and hasattr(torch, "_grouped_mm"):
            y = _grouped_experts(h, w1, b1, w2, b2, m, counts, self.drop)  # [P, D_t]
        else:
            outs = []
            for e, h_e in enumerate(h.split(counts)):
                if h_e.shape[0]:
                    x = self.drop(torch.relu(torch.addmm(b1[e], h_e, w1[e])))  # [n_e, H]
                    outs.append(torch.addmm(b2[e], x, w2[e]))  # [n_e, D_t]
            y = torch.cat(outs)
        y = y.float() * s[b, m].unsqueeze(1)  # [P, D_t]
        return h_s.new_zeros(h_s.shape[0], self.d_t, dtype=y.dtype).index_add(0, b, y)  # [B, D_t]


def _grouped_experts(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, m: Tensor, counts: list[int],
                     drop: nn.Module) -> Tensor:
    """Each row of ``h`` ``[P, D_s]`` (grouped by expert: ``counts[e]`` rows of expert ``e`` in turn, ``m`` ``[P]``
    the row's expert) through its expert's two layers -> ``[P, D_t]``, as two grouped GEMMs (``torch._grouped_mm``,
    forward and backward) instead of two small GEMMs per used expert. The kernel wants every stride a multiple of 16
    bytes, so ``D_s`` and ``H`` are zero-padded (zero weights and biases: the padded hidden units are ``relu(0) = 0``
    and meet zero rows of the second layer; the sums are the same). One thread, M = 30, 2,800 entities, 20 -> 112
    -> 200, forward and backward: 28 -> 13 ms."""
    a = 16 // h.element_size()  # elements per 16 bytes
    d_s, H, d_t = w1.shape[1], w1.shape[2], w2.shape[2]
    ps, ph, pt = -d_s % a, -H % a, -d_t % a
    offs = torch.tensor(counts, device=h.device).cumsum(0).to(torch.int32)  # [M] end of each expert's rows
    x = torch._grouped_mm(F.pad(h, (0, ps)), F.pad(w1, (0, ph, 0, ps)), offs=offs)  # [P, H + ph]
    x = drop(torch.relu(x + F.pad(b1, (0, ph))[m]))
    y = torch._grouped_mm(x, F.pad(w2, (0, pt, 0, ph)), offs=offs)  # [P, D_t + pt]
    return y[:, :d_t] + b2[m]


class Experts(ExpertMLPs):
    """DE's ``M`` experts plus the selection network ``D_t -> M``."""

    def __init__(self, M: int, d_s: int, d_t: int, hidden: int = 0, bf16: bool = False) -> None:
        super().__init__(M, d_s, d_t, hidden, bf16=bf16)
        self.select = nn.Linear(d_t, M)

    def forward(self, h_s: Tensor, h_t: Tensor, tau: float, generator: torch.Generator | None = None,
                skip_below: float = 0.0) -> Tensor:
        """Per-entity DE loss ``||h_t - Σ_m s_m E_m(h_s)||²`` -> ``[B]`` (with ``bf16`` the experts' matmuls and
        hidden layer run in bfloat16: the selection, the mixture weights and the loss stay float32)."""
        if h_s.shape[0] == 0:
            return h_s.new_zeros(0)
        alpha = torch.softmax(self.select(h_t), dim=-1)  # [B, M]
        s = gumbel_softmax(alpha, tau, generator) if self.M > 1 else torch.ones_like(alpha)
        mapped = self.mixture(h_s, s, skip_below)  # [B, D_t] = Σ_m s_m E_m(h_s)
        return ((h_t - mapped) ** 2).sum(dim=1)


class DE(DistillMethod):
    """Distillation Experts (see the module docstring). ``parts``: representation names distilled, e.g.
    ``["emb"]`` (BPR) or ``["gmf", "mlp"]`` (NeuMF, separate)."""

    name = "de"
    needs_teacher = True

    def __init__(self, cfg: DEConfig, *, student_dim: int, teacher_dim: int, parts: list[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.parts = parts
        self.concat = parts == ["concat"]
        width = len(("gmf", "mlp")) if self.concat else 1
        args = (cfg.M, width * student_dim, width * teacher_dim, cfg.hidden, cfg.precision == "bf16")
        self.users = nn.ModuleDict({p: Experts(*args) for p in parts})
        self.items = nn.ModuleDict({p: Experts(*args) for p in parts})
        self.tau = tau_at(cfg, 0)
        self.generator: torch.Generator | None = None

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.tau = tau_at(self.cfg, epoch)
        self.generator = generator
        for e in self._expert_sets():
            e.evaluations = 0

    def _expert_sets(self) -> list[Experts]:
        return [*self.users.values(), *self.items.values()]

    def teacher_request(self, batch: DistillBatch) -> TeacherRequest:
        return TeacherRequest(users=batch.uniq_users, items=torch.cat([batch.uniq_pos, batch.uniq_neg]))

    def _reprs(self, reprs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.concat:
            return {"concat": torch.cat([reprs["gmf"], reprs["mlp"]], dim=-1)}
        return reprs

    def losses(self, *, batch: DistillBatch, student: nn.Module, teacher: TeacherAnswer | None,
               reduction: str = "sum") -> dict[str, Tensor]:
        if self.cfg.lambda_de == 0:
            return {}
        n_pos = batch.uniq_pos.shape[0]
        items = torch.cat([batch.uniq_pos, batch.uniq_neg])
        s_user, s_item = self._reprs(student.user_repr(batch.uniq_users)), self._reprs(student.item_repr(items))
        # the teacher's side never receives gradients, whatever the caller passes
        t_user = {k: v.detach() for k, v in self._reprs(teacher.user).items()}
        t_item = {k: v.detach() for k, v in self._reprs(teacher.item).items()}
        total = 0.0
        for p in self.parts:
            skip = self.cfg.skip_below
            lu = self.users[p](s_user[p], t_user[p].to(s_user[p].dtype), self.tau, self.generator, skip)  # [U_b]
            li = self.items[p](s_item[p], t_item[p].to(s_item[p].dtype), self.tau, self.generator, skip)  # [I_b]
            total = total + reduce_terms(lu, reduction) + self.cfg.item_weight * (
                reduce_terms(li[:n_pos], reduction) + reduce_terms(li[n_pos:], reduction))
        return {"kd/de": self.cfg.lambda_de * total}

    def epoch_metrics(self) -> dict[str, float]:
        """``kd/tau``, and this epoch's expert work on this rank: ``kd/de_evaluations`` (entity, expert) pairs and
        ``kd/de_gflop`` their forward and backward GFLOPs (a floor on the epoch's time at a given matmul rate)."""
        sets = self._expert_sets()
        return {"kd/tau": self.tau, "kd/de_evaluations": float(sum(e.evaluations for e in sets)),
                "kd/de_gflop": sum(e.evaluations * e.flop_per_evaluation() for e in sets) / 1e9}
