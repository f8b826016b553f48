"""Synthetic data: exact counts, no repeated pairs, planted cluster signal, seeded, atomic, streamed in parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayrec.data.readers import read_parquet_table
from rayrec.data.synthetic import generate_synthetic
from rayrec.errors import ArtifactError, ConfigError

KW = dict(num_users=2_000, num_items=5_000, num_interactions=50_000, num_clusters=10, shard_rows=15_000)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, generate_synthetic(out, seed=0, **KW)


def test_counts_parts_and_no_duplicates(synth):
    out, m = synth
    x = read_parquet_table(out)
    assert len(x) == m["counts"]["interactions"] == 50_000
    assert len(np.unique(x.user * 5_000 + x.item)) == len(x)  # no repeated (user, item)
    counts = np.bincount(x.user, minlength=2_000)
    assert counts.min() >= 5 and counts.max() <= m["counts"]["user_cap"]
    users = pq.read_table(out / "meta" / "users.parquet")
    np.testing.assert_array_equal(users.column("count").to_numpy(), counts)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == m["counts"]["parts"] == 4  # ~15k rows each, whole users per part
    assert all(pq.ParquetFile(p).metadata.num_rows <= 15_000 + m["counts"]["user_cap"] for p in parts)
    assert [p.name for p in out.parent.iterdir()] == ["ds"]  # no temp dir left beside it


def test_power_law_activity_and_popularity(synth):
    x = read_parquet_table(synth[0])
    pop = np.sort(np.bincount(x.item, minlength=5_000))[::-1]
    # a popular head and a long tail: the top 1% of items outweigh the bottom 50% (uniform: 1/50 of it)
    assert pop[:50].sum() > 1.5 * pop[-2_500:].sum()
    act = np.sort(np.bincount(x.user))[::-1]
    assert act[:200].sum() > 5 * act[-200:].sum()  # top 10% of users vs bottom 10%


def test_planted_cluster_signal(synth):
    out, m = synth
    x = read_parquet_table(out)
    uc = pq.read_table(out / "meta" / "users.parquet").column("cluster").to_numpy()
    items = pq.read_table(out / "meta" / "items.parquet")
    ic, w = items.column("cluster").to_numpy(), items.column("weight").to_numpy()
    share = float((ic[x.item] == uc[x.user]).mean())
    assert share == pytest.approx(m["in_cluster_share"])
    assert abs(share - m["expected_in_cluster_share"]) < 0.01  # ≈ p + (1 - p) * W_c / W
    assert 0.8 - 0.01 <= share <= 0.8 + 0.2 * 0.2  # p = 0.8, clusters of ~10% of the popularity mass
    popularity_only = float(np.mean(np.bincount(ic, weights=w, minlength=10)[uc[x.user]] / w.sum()))
    assert popularity_only < 0.2 < share - 0.5  # the signal is not explained by popularity


def test_timestamps_increase_per_user(synth):
    t = pq.read_table(synth[0] / "part-00000.parquet").to_pydict()
    u, ts = np.array(t["user"]), np.array(t["timestamp"])
    same = u[1:] == u[:-1]
    assert (ts[1:][same] > ts[:-1][same]).all()


def test_seeded_and_idempotent(synth, tmp_path: Path):
    out, m = synth
    again = generate_synthetic(tmp_path / "b", seed=0, **KW)
    a, b = read_parquet_table(out), read_parquet_table(tmp_path / "b")
    np.testing.assert_array_equal(a.user, b.user)
    np.testing.assert_array_equal(a.item, b.item)
    assert again["counts"] == m["counts"]
    assert generate_synthetic(out, seed=0, **KW)["created"] == m["created"]  # existing, same params: kept
    with pytest.raises(ArtifactError, match="exists"):
        generate_synthetic(out, seed=1, **KW)
    c = read_parquet_table(Path(generate_synthetic(tmp_path / "c", seed=1, **KW) and tmp_path / "c"))
    assert not np.array_equal(a.item[:1000], c.item[:1000])


def test_infeasible_sizes(tmp_path: Path):
    with pytest.raises(ConfigError, match="num_interactions"):
        generate_synthetic(tmp_path / "x", num_users=100, num_items=100, num_interactions=100)  # < 5 per user
    with pytest.raises(ConfigError, match="num_clusters"):
        generate_synthetic(tmp_path / "y", num_users=10, num_items=5, num_interactions=60, num_clusters=20)
    assert list(tmp_path.iterdir()) == []
