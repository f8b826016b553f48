"""Plain-text tables of results, for the terminal and for markdown reports."""

from __future__ import annotations

import math


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def metrics_table(rows: dict[str, dict[str, float]], keys: list[str] | None = None) -> str:
    """Markdown table: one row per model (``rows[label] = {metric: value}``), one column per metric key."""
    if keys is None:
        keys = []
        for m in rows.values():
            keys += [k for k in m if k not in keys]
    header = ["model", *keys]
    body = [[label, *(_fmt(m.get(k)) for k in keys)] for label, m in rows.items()]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def default_metric_keys(metrics: dict[str, float]) -> list[str]:
    """Test-split keys in the order of ``../shared/docs/results.md``: sampled H/N/M@K, then full ranking."""
    sampled = sorted((k for k in metrics if k.startswith("test/")), key=lambda k: (int(k.split("@")[1]), k.split("/")[1][0] != "H", k))
    full = sorted((k for k in metrics if k.startswith("full/")), key=lambda k: (int(k.split("@")[1]), k))
    return sampled + full
