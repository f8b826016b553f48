"""How much memory a worker needs for its share of the embedding tables, and the per-worker budget check.

Per table of ``R`` rows and ``D`` fp32 columns, the weights take ``4·R·D`` bytes and the fused optimizer state
``4·R`` (row-wise Adagrad: one accumulator per row), ``4·R·D`` (Adagrad), ``8·R·D`` (Adam) or nothing (SGD).
A worker holds ``1/W`` of every table with ``row_wise`` and ``column_wise`` sharding, whole tables with
``table_wise`` (tables are placed greedily, largest first, on the least loaded worker) and everything with
``data_parallel``. The estimate is what the planner places; the process also holds the Python runtime, the
data and the batch (measured in ``benchmarks/sharded_teacher.py``).
"""

from __future__ import annotations

from rayrec.errors import ConfigError

_STATE_PER_ROW = {"exact_sgd": lambda d: 0, "exact_rowwise_adagrad": lambda d: 1, "exact_adagrad": lambda d: d,
                  "adam": lambda d: 2 * d}


def model_tables(name: str, num_users: int, num_items: int, dim: int) -> list[tuple[int, int]]:
    """``(rows, dim)`` of every embedding table of a base model."""
    if name in ("bpr", "lightgcn"):
        return [(num_users, dim), (num_items, dim)]
    if name == "neumf":
        return [(num_users, dim), (num_items, dim)] * 2
    raise ValueError(f"unknown model {name!r}")


def table_bytes_per_worker(tables: list[tuple[int, int]], sharding: str, optimizer: str, world: int) -> int:
    """Largest per-worker share (bytes) of ``tables`` (weights + fused optimizer state) at ``world`` workers."""
    sizes = [4 * r * (d + _STATE_PER_ROW[optimizer](d)) for r, d in tables]
    if sharding in ("row_wise", "column_wise"):
        return sum(-(-s // world) for s in sizes)
    if sharding == "table_wise":
        bins = [0] * world
        for s in sorted(sizes, reverse=True):
            bins[bins.index(min(bins))] += s
        return max(bins)
    return sum(sizes)  # data_parallel (and unsharded): every worker holds everything


def check_table_budget(name: str, num_users: int, num_items: int, dim: int, sharding: str, optimizer: str,
                       world: int, budget_mb: float) -> int:
    """Refuse (``ConfigError``) a model whose per-worker table share exceeds ``budget_mb``; return the share."""
    tables = model_tables(name, num_users, num_items, dim)
    need = table_bytes_per_worker(tables, sharding, optimizer, world)
    if budget_mb and need > budget_mb * 2**20:
        fits = next((w for w in range(world + 1, 4097)
                     if table_bytes_per_worker(tables, sharding, optimizer, w) <= budget_mb * 2**20), None)
        hint = (f"use ray.num_workers >= {fits}" if fits else "no worker count fits it with this sharding type")
        raise ConfigError(
            f"the {name} model's tables ({num_users:,} users + {num_items:,} items x {dim}, {optimizer} state) "
            f"need {need / 2**20:,.1f} MiB per worker with model.sharding={sharding} at ray.num_workers={world}, "
            f"over model.table_budget_mb={budget_mb:g}; {hint}")
    return need
