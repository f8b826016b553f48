"""Distillation methods, one per file, behind :class:`rayrec.distill.base.DistillMethod`.

``METHODS`` maps the config key (``distill.method``) to the method; :func:`build_method` builds one inside a
worker from the config, the student's size and the teacher's artifacts.
"""

from __future__ import annotations

import numpy as np

from rayrec.distill.base import DistillBatch, DistillMethod, TeacherAnswer, TeacherRequest
from rayrec.errors import ConfigError

METHODS = ("none", "rd", "cd", "de", "rrd", "de_rrd", "nkd")
NEEDS_CHECKPOINT = {"de", "de_rrd", "nkd"}  # the frozen sharded teacher, looked up every step
NEEDS_RANKING = {"rd", "cd", "rrd", "de_rrd"}  # the teacher's top-N lists
NEEDS_NEIGHBORS = {"nkd"}  # the teacher-space k nearest users and items

REPR_PARTS = {"bpr": ["emb"], "neumf": ["gmf", "mlp"], "lightgcn": ["emb"]}


def build_method(dc, *, student_name: str, student_dim: int, num_items: int, train_csr: tuple[np.ndarray, np.ndarray],
                 topn: np.ndarray | None = None, topn_scores: np.ndarray | None = None,
                 neighbors: dict[str, np.ndarray] | None = None) -> DistillMethod | None:
    """The method of ``dc`` (a :class:`rayrec.config.DistillConfig`); None for ``none``."""
    m = dc.method
    if m == "none":
        return None
    rrd_off = m == "de_rrd" and dc.rrd.lambda_rrd == 0  # DE-RRD with its RRD part switched off needs no lists
    if m in NEEDS_RANKING and topn is None and not rrd_off:
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
    if m == "nkd":
        from rayrec.distill.nkd import NKD

        if not neighbors:
            raise ConfigError("distill.method=nkd needs the teacher's neighbour lists (rank.user_neighbors / "
                              "rank.item_neighbors in rank_teacher, then distill.teacher.ranking)")
        return NKD(dc.nkd, student_dim=student_dim, teacher_dim=dc.teacher.dim, user_nn=neighbors["user"],
                   item_nn=neighbors["item"])
    raise ConfigError(f"unknown distill.method {m!r}")  # pragma: no cover - Literal-checked


__all__ = ["METHODS", "NEEDS_CHECKPOINT", "NEEDS_NEIGHBORS", "NEEDS_RANKING", "DistillBatch", "DistillMethod", "TeacherAnswer", "TeacherRequest", "build_method"]
