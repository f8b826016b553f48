"""Distillation methods, one per file, behind :class:`rayrec.distill.base.DistillMethod`.

``METHODS`` maps the config key (``distill.method``) to the method; :func:`build_method` builds one inside a
worker from the config, the student's size and the teacher's artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest
from rayrec.errors import ConfigError

METHODS = ("none", "rd", "cd", "de", "rrd", "de_rrd", "nkd", "cpd", "sld", "mkd", "htd", "unkd")
NEEDS_CHECKPOINT = {"de", "de_rrd", "nkd", "cpd", "sld", "mkd", "htd"}  # the frozen sharded teacher, looked up every step
NEEDS_RANKING = {"rd", "cd", "rrd", "de_rrd", "cpd", "sld", "mkd", "unkd"}  # the teacher's top-N lists
NEEDS_NEIGHBORS = {"nkd", "mkd"}  # the teacher-space k nearest users and items

REPR_PARTS = {"bpr": ["emb"], "neumf": ["gmf", "mlp"], "lightgcn": ["emb"]}
SINGLE_REPR = {"nkd", "cpd", "sld", "mkd"}  # methods reading one "emb" representation (BPR-MF, LightGCN)


@dataclass(frozen=True)
class Needs:
    """Which teacher artifacts a configured method reads (a part switched off by its weight reads nothing)."""

    checkpoint: bool  # the frozen sharded teacher, looked up every step
    lists: bool  # the teacher's top-N lists of the ranking artifact
    neighbors: bool  # the teacher-space neighbour lists of the ranking artifact


def mkd_components(dc) -> list[str]:
    """MKD's active components: listed in ``distill.mkd.components`` and with a non-zero λ."""
    lam = {"nkd": dc.nkd.lambda_n, "cpd": dc.cpd.lambda_c, "sld": dc.sld.lambda_s}
    return [c for c in dc.mkd.components if lam[c] > 0]


def needs(dc) -> Needs:
    """The artifacts ``dc`` (a :class:`rayrec.config.DistillConfig`) reads."""
    m = dc.method
    if m == "none":
        return Needs(False, False, False)
    if m == "de_rrd":
        return Needs(dc.de.lambda_de > 0, dc.rrd.lambda_rrd > 0, False)
    if m == "mkd":
        comp = mkd_components(dc)
        cpd_lists = "cpd" in comp and dc.cpd.needs_lists and dc.cpd.guide == "teacher"
        return Needs(bool(comp), cpd_lists or "sld" in comp, "nkd" in comp)
    if m == "cpd":
        return Needs(True, dc.cpd.needs_lists and dc.cpd.guide == "teacher", False)
    return Needs(m in NEEDS_CHECKPOINT, m in NEEDS_RANKING, m in NEEDS_NEIGHBORS)


def build_method(dc, *, student_name: str, student_dim: int, num_items: int, train_csr: tuple[np.ndarray, np.ndarray],
                 topn: np.ndarray | None = None, topn_scores: np.ndarray | None = None,
                 neighbors: dict[str, np.ndarray] | None = None) -> DistillMethod | None:
    """The method of ``dc`` (a :class:`rayrec.config.DistillConfig`); None for ``none``."""
    m = dc.method
    if m == "none":
        return None
    rrd_off = m == "de_rrd" and dc.rrd.lambda_rrd == 0  # DE-RRD with its RRD part switched off needs no lists
    if needs(dc).lists and topn is None:
        raise ConfigError(f"distill.method={m} needs the teacher's ranking (distill.teacher.ranking)")

    def de():
        from rayrec.distill.de import DE

        if dc.teacher.name != student_name:
            raise ConfigError(f"DE maps student representations onto the teacher's: distill.teacher.name="
                              f"{dc.teacher.name} must equal model.name={student_name}")
        parts = ["concat"] if (student_name == "neumf" and dc.de.neumf_parts == "concat") else REPR_PARTS[student_name]
        return DE(dc.de, student_dim=student_dim, teacher_dim=dc.teacher.dim, parts=parts)

    def rrd():
        from rayrec.distill.rrd import RRD

        return RRD(dc.rrd, topn=topn, train_indptr=train_csr[0], train_indices=train_csr[1], num_items=num_items)

    if m == "de":
        return de()
    if m == "rrd":
        return rrd()
    if m == "de_rrd":
        from rayrec.distill.de_rrd import DERRD

        return DERRD(de(), None if rrd_off else rrd())
    if m == "rd":
        from rayrec.distill.rd import RD

        return RD(dc.rd, topn=topn)
    if m == "cd":
        from rayrec.distill.cd import CD

        return CD(dc.cd, topn=topn, topn_scores=topn_scores)
    if m == "htd":
        from rayrec.distill.htd import HTD

        if REPR_PARTS[dc.teacher.name] != REPR_PARTS[student_name]:
            raise ConfigError(f"HTD compares student and teacher representations part by part: distill.teacher.name="
                              f"{dc.teacher.name} and model.name={student_name} must have the same parts")
        parts = ["concat"] if (student_name == "neumf" and dc.htd.neumf_parts == "concat") else REPR_PARTS[student_name]
        return HTD(dc.htd, student_dim=student_dim, teacher_dim=dc.teacher.dim, parts=parts)
    if m == "unkd":
        from rayrec.distill.unkd import UnKD

        return UnKD(dc.unkd, topn=topn, train_indptr=train_csr[0], train_indices=train_csr[1], num_items=num_items)
    if m in SINGLE_REPR and student_name not in ("bpr", "lightgcn"):
        raise ConfigError(f"distill.method={m} reads one embedding per entity: student model.name must be bpr or "
                          f"lightgcn, got {student_name}")
    if m in SINGLE_REPR and dc.teacher.name not in ("bpr", "lightgcn"):
        raise ConfigError(f"distill.method={m} needs a dot-product teacher (bpr or lightgcn), got {dc.teacher.name}")

    def nkd():
        from rayrec.distill.nkd import NKD

        if not neighbors:
            raise ConfigError(f"distill.method={m} needs the teacher's neighbour lists (rank.user_neighbors / "
                              "rank.item_neighbors in rank_teacher, then distill.teacher.ranking)")
        return NKD(dc.nkd, student_dim=student_dim, teacher_dim=dc.teacher.dim, user_nn=neighbors["user"],
                   item_nn=neighbors["item"])

    def cpd():
        from rayrec.distill.cpd import CPD

        return CPD(dc.cpd, student_dim=student_dim, teacher_dim=dc.teacher.dim, num_items=num_items, topn=topn)

    def sld():
        from rayrec.distill.sld import SLD

        if topn is None:
            raise ConfigError(f"distill.method={m} needs the teacher's ranking (distill.teacher.ranking)")
        return SLD(dc.sld, topn=topn, num_items=num_items, train_csr=train_csr)

    if m == "nkd":
        return nkd()
    if m == "cpd":
        return cpd()
    if m == "sld":
        return sld()
    if m == "mkd":
        from rayrec.distill.mkd import MKD

        build = {"nkd": nkd, "cpd": cpd, "sld": sld}
        return MKD({c: build[c]() for c in mkd_components(dc)})
    raise ConfigError(f"unknown distill.method {m!r}")  # pragma: no cover - Literal-checked


__all__ = ["METHODS", "NEEDS_CHECKPOINT", "NEEDS_NEIGHBORS", "NEEDS_RANKING", "Needs", "needs", "DistillBatch", "DistillMethod", "TeacherAnswer", "TeacherRequest", "build_method"]
