"""Evaluation metrics (sampled leave-one-out and full-ranking protocols). Pure torch; see :mod:`rayrec.eval.metrics`."""

from rayrec.eval.metrics import (
    chunk_size_for,
    full_ranking_metrics,
    masked_topk,
    sampled_metrics,
    sampled_ranks,
    select_csr_rows,
)

__all__ = [
    "sampled_ranks",
    "sampled_metrics",
    "full_ranking_metrics",
    "masked_topk",
    "chunk_size_for",
    "select_csr_rows",
]
