"""Benchmark scripts run (--smoke) and every committed result file follows ../shared/docs/results.md."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("benchmark", "command", "commit", "created", "machine", "rows")


def _check_format(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert all(k in doc for k in REQUIRED), path
    assert "benchmarks/" in doc["command"]
    for row in doc["rows"]:
        assert row["label"] == row["label"].lower() and "metrics" in row
    return doc


def test_committed_results_have_the_shared_format():
    for p in sorted((REPO / "benchmarks/results").glob("*.json")):
        _check_format(p)


def test_eval_memory_smoke():
    from benchmarks.eval_memory import main

    doc = _check_format(main(["--smoke"]))
    assert [r["extra"]["users"] for r in doc["rows"]] == [2000, 4000]
    assert all(0 <= r["metrics"]["full/Recall@20"] <= 1 for r in doc["rows"])


def test_synthetic_scale_smoke():
    from benchmarks.synthetic_scale import main

    doc = _check_format(main(["--smoke"]))
    extra = doc["rows"][0]["extra"]
    assert extra["prepared_counts"]["interactions"] == 200_000
    assert extra["in_cluster_share"] == pytest.approx(0.81, abs=0.02)


@pytest.mark.ray
def test_bpr_citeulike_smoke(ray_session, tmp_path):
    from benchmarks.bpr_citeulike import main

    doc = _check_format(main(["ray.num_workers=1", f"storage_root={tmp_path}", "--smoke", "--dims", "20"]))
    (row,) = doc["rows"]
    assert row["label"] == "bpr_d20" and row["extra"]["num_parameters"] == 608_040
    assert set(row["metrics"]) >= {"test/H@5", "test/N@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20",
                                   "full/Recall@20", "full/NDCG@20"}
