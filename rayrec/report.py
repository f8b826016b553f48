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


def compare_report(summaries: dict[str, dict], out, latency_users: int = 64, k: int = 20,
                   progress=print):
    """Teacher vs students: ``compare.md`` (metrics, parameters, top-``k`` latency for ``latency_users`` users,
    each model's size and latency as a ratio of the teacher's), ``compare.json`` and ``compare.png`` (bar chart
    of the headline metrics) under ``out``. ``summaries``: label -> a run summary (``fit``'s return) with its
    final ``checkpoint``; the first label containing ``teacher`` is the reference. Returns ``compare.md``."""
    import json
    from pathlib import Path

    import torch

    from rayrec.serve import latency, load_dense_model, serving_module

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    torch.manual_seed(0)
    for label, s in summaries.items():
        m = s["metrics"]
        row = {"num_parameters": s["num_parameters"], "best_epoch": s["best_epoch"],
               "epoch_s": round(s["timing"]["epoch_train_s"], 3)}
        row.update({key: m[key] for key in default_metric_keys(m)})
        try:
            module = serving_module(load_dense_model(s["checkpoint"], s.get("prepared")), k)
            users = torch.randint(0, module.inner.num_users(), (latency_users,))
            row.update({f"top{k}_{q}": v for q, v in latency(module, users).items()})
        except Exception as e:  # noqa: BLE001 - a teacher too large for one process: no latency, said so
            row[f"top{k}_p50_ms"] = None
            row["latency_error"] = f"{type(e).__name__}: {e}"[:200]
        rows[label] = row
    ref = next((label for label in rows if "teacher" in label), None)
    if ref is not None:
        for label, row in rows.items():
            row["size_ratio"] = row["num_parameters"] / rows[ref]["num_parameters"]
            t = rows[ref].get(f"top{k}_p50_ms")
            row["latency_ratio"] = row[f"top{k}_p50_ms"] / t if t and row.get(f"top{k}_p50_ms") else None
    headline = ["test/H@5", "test/N@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20", "full/Recall@10",
                "full/NDCG@10", "full/Recall@20", "full/NDCG@20"]
    present = [key for key in next(iter(rows.values())) if key.startswith(("test/", "full/"))]
    metric_keys = [key for key in headline if key in present] or present
    cols = [*metric_keys, "num_parameters", "size_ratio", f"top{k}_p50_ms", "latency_ratio", "epoch_s"]
    table = metrics_table(rows, cols)
    md = ["# Teacher vs students\n", f"Top-{k} latency: p50 over 20 calls for a batch of {latency_users} users "
          f"(single process, this machine); ratios relative to `{ref}`.\n", table, ""]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    _bar_chart(rows, [key for key in ("test/H@5", "test/N@10", "full/Recall@20", "full/NDCG@20") if key in cols]
               or metric_keys[:4], out / "compare.png")
    progress(f"[report] {out / 'compare.md'}\n{table}")
    return out / "compare.md"


def _bar_chart(rows: dict[str, dict], keys: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        vals = [rows[label].get(key) or 0.0 for label in labels]
        ax.bar(range(len(labels)), vals, color=["#777" if "teacher" in label else "#3a7" for label in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
