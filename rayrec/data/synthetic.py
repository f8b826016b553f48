"""Seeded synthetic implicit-feedback data with planted cluster structure, streamed to parquet parts.

Generative model (U users, I items, C clusters, N interactions):

* item popularity ``w_i = (1 + rank_i) ** -item_alpha`` over a random permutation of ranks (Zipf-like);
* user activity ``k_u = min_user_interactions + Multinomial(N - U * min, a_u)`` with ``a_u ∝ (1 + rank_u) **
  -user_alpha`` (power law), capped at ``user_cap`` so every user can find ``k_u`` distinct items (the excess is
  re-spread over uncapped users: the total is exactly N);
* every user and item gets a cluster (items: balanced, random; users: uniform). Each interaction of user u is,
  with probability ``p_in_cluster``, an item of u's cluster drawn by popularity within the cluster, otherwise an
  item drawn by global popularity (``Binomial(k_u, p)`` in-cluster slots). A draw that repeats an item u already
  has is dropped and drawn again from the same source (successive sampling without replacement): no (user,
  item) pair occurs twice.

So the share of interactions that fall in the user's own cluster is about
``p + (1 - p) * W_c / W`` (≈ 0.81 for p = 0.8, C = 20: global draws may land in the cluster too), where
popularity alone would give ``W_c / W`` (≈ 1 / C): a signal a model can learn.

Layout (written atomically: temp dir beside ``out_dir``, then rename)::

    out_dir/part-00000.parquet ...    user:int64, item:int64, timestamp:int64 (per user increasing), ~shard_rows each
    out_dir/meta/users.parquet        id, cluster, count
    out_dir/meta/items.parquet        id, cluster, popularity weight
    out_dir/manifest.json             parameters, actual counts, in-cluster share, timing

Users are generated chunk by chunk (one part file per chunk), so memory stays at O(shard_rows + U + I). Read it
back with reader ``parquet`` (``DataConfig(dataset="files", files=[out_dir], reader="parquet")``, or dataset
``synthetic`` for ``<root>/synthetic``); the parquet reader only reads the top-level ``*.parquet``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayrec.errors import ArtifactError, ConfigError

__all__ = ["generate_synthetic"]

_T0 = 1_500_000_000  # epoch seconds of the earliest synthetic timestamp


def _powerlaw_weights(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """``(1 + rank) ** -alpha`` with ranks a random permutation of ``0..n-1``: ``[n]`` float64."""
    return (1.0 + rng.permutation(n)) ** -float(alpha)


def _user_counts(
    rng: np.random.Generator, weights: np.ndarray, total: int, minimum: int, cap: int
) -> tuple[np.ndarray, int]:
    """Per-user counts ``[U]`` summing to ``total``, each in ``[minimum, cap]``; and how many users hit the cap."""
    U = len(weights)
    counts = np.full(U, minimum, dtype=np.int64) + rng.multinomial(total - U * minimum, weights / weights.sum())
    capped = np.zeros(U, dtype=bool)
    while (over := counts > cap).any():  # water-filling: move the excess onto users below the cap
        excess = int((counts[over] - cap).sum())
        counts[over] = cap
        capped |= over
        room = ~capped & (counts < cap)
        w = np.where(room, weights, 0.0)
        counts += rng.multinomial(excess, w / w.sum())
    return counts, int((counts == cap).sum())


def generate_synthetic(
    out_dir: str | Path,
    num_users: int,
    num_items: int,
    num_interactions: int,
    num_clusters: int = 20,
    seed: int = 0,
    shard_rows: int = 1_000_000,
    user_alpha: float = 0.8,
    item_alpha: float = 1.0,
    p_in_cluster: float = 0.8,
    min_user_interactions: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate the dataset described in the module docstring into ``out_dir``; return its manifest.

    If ``out_dir`` already holds a dataset generated with the same parameters it is kept and its manifest
    returned; any other existing ``out_dir`` raises :class:`ArtifactError` (it is never overwritten).
    """
    U, I, N, C = int(num_users), int(num_items), int(num_interactions), int(num_clusters)
    if min(U, I, N, C, shard_rows) <= 0 or C > I:
        raise ConfigError(f"need positive sizes and num_clusters <= num_items, got U={U} I={I} N={N} C={C}")
    if not 0.0 <= p_in_cluster <= 1.0:
        raise ConfigError(f"p_in_cluster must lie in [0, 1], got {p_in_cluster}")
    smallest_cluster = I // C
    # a user must find its in-cluster share of distinct items inside one cluster without exhausting it
    cap = I // 2 if p_in_cluster == 0 else min(I // 2, int(0.5 * smallest_cluster / p_in_cluster))
    cap = max(cap, min_user_interactions)
    if N < U * min_user_interactions or N > U * cap:
        raise ConfigError(
            f"num_interactions={N:,} must lie in [{U * min_user_interactions:,}, {U * cap:,}] for {U:,} users "
            f"with {min_user_interactions}..{cap} interactions each (cap from num_items and num_clusters)"
        )
    params = {
        "num_users": U, "num_items": I, "num_interactions": N, "num_clusters": C, "seed": int(seed),
        "shard_rows": int(shard_rows), "user_alpha": float(user_alpha), "item_alpha": float(item_alpha),
        "p_in_cluster": float(p_in_cluster), "min_user_interactions": int(min_user_interactions),
    }
    out = Path(out_dir).resolve()
    if out.exists():
        try:
            existing = json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError):
            existing = None
        if existing is not None and existing.get("params") == params:
            return existing
        raise ArtifactError(
            f"{out} exists and is not a synthetic dataset with these parameters; delete it or pick another out_dir"
        )

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    # --- items: popularity and balanced clusters; layout grouped by cluster for in-cluster inverse-CDF draws
    item_w = _powerlaw_weights(rng, I, item_alpha)  # [I]
    item_cluster = (rng.permutation(I) % C).astype(np.int64)  # [I]
    by_cluster = np.argsort(item_cluster, kind="stable")  # [I] item ids grouped by cluster
    cum_c = np.cumsum(item_w[by_cluster])  # [I]
    c_end = np.cumsum(np.bincount(item_cluster, minlength=C))  # [C] exclusive end of each cluster's block
    c_start = c_end - np.bincount(item_cluster, minlength=C)  # [C]
    c_lo = np.where(c_start > 0, cum_c[np.maximum(c_start - 1, 0)], 0.0)  # [C] cumulative mass before cluster
    c_mass = cum_c[c_end - 1] - c_lo  # [C] W_c
    cum_g = np.cumsum(item_w)  # [I]
    # --- users: clusters and activity
    user_cluster = rng.integers(0, C, size=U, dtype=np.int64)  # [U]
    counts, n_capped = _user_counts(rng, _powerlaw_weights(rng, U, user_alpha), N, min_user_interactions, cap)
    expected_share = float(p_in_cluster + (1 - p_in_cluster) * np.mean(c_mass[user_cluster] / cum_g[-1]))

    # --- chunks of whole users, ~shard_rows interactions each, one part file per chunk
    ends = np.cumsum(counts)  # [U]
    cuts = np.searchsorted(ends, np.arange(shard_rows, N, shard_rows), side="left") + 1
    bounds = np.unique(np.concatenate([[0], cuts, [U]]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / "meta").mkdir(parents=True)
    try:
        in_cluster = 0
        item_seen = np.zeros(I, dtype=bool)
        written = 0
        for k in range(len(bounds) - 1):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            crng = np.random.default_rng(np.random.SeedSequence([seed, 1, k]))
            user, item = _sample_chunk(
                crng, np.arange(lo, hi, dtype=np.int64), counts[lo:hi], user_cluster, p_in_cluster,
                by_cluster, cum_c, c_start, c_end, c_lo, c_mass, cum_g, I,
            )
            ts = _timestamps(crng, counts[lo:hi])  # [T]
            pq.write_table(
                pa.table({"user": pa.array(user), "item": pa.array(item), "timestamp": pa.array(ts)}),
                tmp / f"part-{k:05d}.parquet",
            )
            in_cluster += int((item_cluster[item] == user_cluster[user]).sum())
            item_seen[item] = True
            written += len(user)
            say(f"[synthetic] part {k:05d}: users {lo:,}..{hi - 1:,}, {len(user):,} rows ({written:,}/{N:,})")
        assert written == N, (written, N)
        pq.write_table(pa.table({"id": np.arange(U, dtype=np.int64), "cluster": user_cluster, "count": counts}),
                       tmp / "meta" / "users.parquet")
        pq.write_table(pa.table({"id": np.arange(I, dtype=np.int64), "cluster": item_cluster, "weight": item_w}),
                       tmp / "meta" / "items.parquet")
        manifest = {
            "generator": "rayrec.data.synthetic.generate_synthetic",
            "format_version": 1,
            "params": params,
            "counts": {
                "users": U, "items": I, "items_with_interactions": int(item_seen.sum()), "interactions": N,
                "parts": len(bounds) - 1, "user_cap": cap, "capped_users": n_capped,
                "max_user_interactions": int(counts.max()),
            },
            "in_cluster_share": in_cluster / N,
            "expected_in_cluster_share": expected_share,
            "seconds": round(time.perf_counter() - t0, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"[synthetic] wrote {out}: {N:,} interactions in {manifest['seconds']}s")
    return manifest


def _sample_chunk(
    rng: np.random.Generator,
    users: np.ndarray,  # [Uc] consecutive user ids
    k: np.ndarray,  # [Uc] distinct items wanted per user
    user_cluster: np.ndarray,  # [U]
    p: float,
    by_cluster: np.ndarray,  # [I] item ids grouped by cluster
    cum_c: np.ndarray,  # [I] cumulative weights in by_cluster order
    c_start: np.ndarray,  # [C]
    c_end: np.ndarray,  # [C]
    c_lo: np.ndarray,  # [C]
    c_mass: np.ndarray,  # [C]
    cum_g: np.ndarray,  # [I] cumulative weights in id order
    I: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``k[j]`` distinct items for each user; rows sorted by user, then draw order.

    Each user's ``k`` slots are split once into ``Binomial(k, p)`` in-cluster slots (capped at the cluster size)
    and global-popularity slots. Every draw has a source (group g = 2 * j + in_cluster); a draw that repeats an
    item the user already has is dropped and that source draws again (successive sampling without replacement).
    """
    Uc = len(users)
    size_c = (c_end - c_start)[user_cluster[users]]  # [Uc] items in the user's cluster
    k_in = np.minimum(rng.binomial(k, p), size_c)  # [Uc]
    need = np.stack([k - k_in, k_in], axis=1).reshape(-1)  # [2 Uc] still missing per (user, source)
    g_user = np.repeat(users, 2)  # [2 Uc]
    g_inside = np.tile(np.array([False, True]), Uc)  # [2 Uc]
    acc_g: list[np.ndarray] = []
    acc_i: list[np.ndarray] = []
    seen = np.empty(0, dtype=np.int64)  # sorted keys user * I + item accepted so far
    margin = 1.25
    while need.sum() > 0:
        todo = np.flatnonzero(need)  # [Gt] groups still short
        draws = np.ceil(need[todo] * margin).astype(np.int64) + 2  # [Gt]
        row_g = np.repeat(todo, draws)  # [D] draws grouped by group, in draw order
        row_u = g_user[row_g]  # [D]
        D = len(row_g)
        c = user_cluster[row_u]  # [D]
        x = rng.random(D)  # [D]
        pos_c = np.searchsorted(cum_c, c_lo[c] + x * c_mass[c], side="right")
        pos_c = np.clip(pos_c, c_start[c], c_end[c] - 1)  # float edge cases stay inside the cluster
        pos_g = np.minimum(np.searchsorted(cum_g, x * cum_g[-1], side="right"), I - 1)
        item = np.where(g_inside[row_g], by_cluster[pos_c], pos_g)  # [D]
        key = row_u * I + item  # [D]
        # fresh = first occurrence of the pair in this round (across both sources) and not accepted before
        _, first = np.unique(key, return_index=True)
        fresh = np.zeros(D, dtype=bool)
        fresh[first] = True
        if len(seen):
            at = np.minimum(np.searchsorted(seen, key), len(seen) - 1)
            fresh &= seen[at] != key
        # keep the earliest need[g] fresh draws of each group
        rank = np.cumsum(fresh) - 1  # [D] index among all fresh draws
        starts = np.cumsum(draws) - draws  # [Gt] first draw of each group
        before = rank[starts] + 1 - fresh[starts]  # [Gt] fresh draws before the group's block
        within = rank - np.repeat(before, draws)  # [D] 0-based rank among the group's fresh draws
        take = fresh & (within < np.repeat(need[todo], draws))
        # the same pair drawn by both sources of a user in one round: `first` kept only one of them
        acc_g.append(row_g[take])
        acc_i.append(item[take])
        seen = np.sort(np.concatenate([seen, key[take]]))
        need[todo] -= np.bincount(np.repeat(np.arange(len(todo)), draws)[take], minlength=len(todo))
        margin *= 2  # groups still short are the unlucky / heavy ones: draw more next round
    grp = np.concatenate(acc_g)
    item = np.concatenate(acc_i)
    order = np.argsort(g_user[grp], kind="stable")  # rounds were appended in order: draw order kept per user
    return g_user[grp][order], item[order]


def _timestamps(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    """Per-user increasing timestamps ``[sum(k)]``: a random start plus cumulative random gaps (1 min .. 1 week)."""
    T = int(k.sum())
    gaps = rng.integers(60, 7 * 86_400, size=T, dtype=np.int64)  # [T]
    csum = np.cumsum(gaps)  # [T]
    starts = np.cumsum(k) - k  # [Uc]
    base = np.repeat(csum[starts] - gaps[starts], k)  # [T] cumulative gap before each user's block
    start = np.repeat(rng.integers(0, 365 * 86_400, size=len(k), dtype=np.int64), k)  # [T]
    return _T0 + start + csum - base
