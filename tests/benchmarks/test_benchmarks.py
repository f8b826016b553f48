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
    for row in doc["rows"]:  # quality rows carry metrics; memory/speed rows may carry only timing
        assert row["label"] == row["label"].lower() and ("metrics" in row or "timing" in row)
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
    assert list((tmp_path / "ray_train").glob("bench_bpr_d20-*"))  # the given storage root, not runs/smoke
    assert set(row["metrics"]) >= {"test/H@5", "test/N@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20",
                                   "full/Recall@20", "full/NDCG@20"}


@pytest.mark.slow  # ~50 s; the sharded paths it times are tested in tests/sharding and tests/train/test_fit.py
@pytest.mark.ray
def test_sharded_teacher_smoke(ray_session, tmp_path):
    from benchmarks.sharded_teacher import main

    doc = _check_format(main(["--smoke", f"storage_root={tmp_path}"]))
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"memory_ws1", "memory_ws2", "bpr_teacher", "train_sharded", "rank_top500"}
    # 2M rows x 64 dims: the per-worker share of the tables halves (the rest is the Python runtime)
    assert rows["memory_ws2"]["extra"]["tables_estimate_mib"] == pytest.approx(rows["memory_ws1"]["extra"]["tables_estimate_mib"] / 2, rel=0.01)
    # resident growth while the tables are built (the peak of a small run is dominated by imports and transients)
    grown = {w: max(r["after_build_mib"] - r["base_mib"] for r in rows[f"memory_ws{w}"]["extra"]["per_rank"])
             for w in (1, 2)}
    assert grown[1] > 400 and grown[2] < 0.6 * grown[1], grown  # ~500 vs ~250 MiB
    assert rows["bpr_teacher"]["world_size"] == 2 and rows["bpr_teacher"]["metrics"]["test/H@10"] > 0.1
    assert rows["rank_top500"]["extra"]["scoring_flop_per_s"] > 0 and rows["rank_top500"]["extra"]["matmul_ratio"] > 0
    assert rows["train_sharded"]["timing"]["rows_per_s"] > 0


@pytest.mark.slow  # ~70 s; its stages (sharded teacher, rank, DE-RRD) run in tests/entrypoints/test_main.py
@pytest.mark.ray
def test_derrd_citeulike_smoke(ray_session, tmp_path):
    from benchmarks.derrd_citeulike import main

    doc = _check_format(main([f"storage_root={tmp_path}", "--smoke", "--models", "bpr", "--methods", "none", "de_rrd",
                              "--seeds", "0"]))
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"bpr_teacher", "bpr_none", "bpr_de_rrd"} and rows["bpr_de_rrd"]["extra"]["complete"]
    assert rows["bpr_de_rrd"]["extra"]["num_parameters"] == rows["bpr_none"]["extra"]["num_parameters"]
    assert rows["bpr_de_rrd"]["extra"]["paper"]["test/H@5"] == 0.4843
    assert (Path(doc_path := REPO / "benchmarks/results/smoke/derrd_citeulike.md")).read_text().count("| bpr_") == 3, doc_path


@pytest.mark.slow  # ~60 s; MKD's stages run in tests/train/test_fit.py and tests/distill/test_mkd.py
@pytest.mark.ray
def test_mkd_citeulike_smoke(ray_session, tmp_path):
    from benchmarks.mkd_citeulike import main

    doc = _check_format(main([f"storage_root={tmp_path}", "--smoke", "--models", "bpr", "--methods", "none", "mkd",
                              "--seeds", "0", "--teacher-overrides", "ray.num_workers=1"]))
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"bpr_teacher", "bpr_none", "bpr_mkd"} and rows["bpr_mkd"]["extra"]["complete"]
    assert rows["bpr_teacher"]["world_size"] == 1  # the teacher override reached its training
    assert rows["bpr_mkd"]["extra"]["tuned"] == []  # --smoke (ML-100K) runs the defaults, not CiteULike's TUNED
    # the weights each row ran with, for the aggregate's check that merged seeds ran the same ones
    mc = rows["bpr_mkd"]["extra"]["method_config"]
    assert set(mc) == {"mkd", "nkd", "cpd", "sld"} and mc["cpd"]["lambda_c"] == 1.0 and "precision" not in mc["cpd"]
    assert "method_config" not in rows["bpr_none"]["extra"]
    # projectors are training-only: the MKD student has the student-alone parameter count
    assert rows["bpr_mkd"]["extra"]["num_parameters"] == rows["bpr_none"]["extra"]["num_parameters"]
    assert {"full/Recall@10", "full/NDCG@20"} <= set(rows["bpr_mkd"]["metrics"])
    # the same command with --resume: every run finished with the same config, so nothing trains again
    runs = sorted(p.name for p in (tmp_path / "ray_train").iterdir())
    again = _check_format(main([f"storage_root={tmp_path}", "--smoke", "--models", "bpr", "--methods", "none", "mkd",
                                "--seeds", "0", "--resume", "--teacher-overrides", "ray.num_workers=1"]))
    assert sorted(p.name for p in (tmp_path / "ray_train").iterdir()) == runs
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in doc["rows"]]
    # --precision bf16 is a config of the methods with projectors only: the student alone is kept, MKD trains again
    bf16 = _check_format(main([f"storage_root={tmp_path}", "--smoke", "--models", "bpr", "--methods", "none", "mkd",
                               "--seeds", "0", "--resume", "--precision", "bf16", "--teacher-overrides",
                               "ray.num_workers=1"]))
    new = sorted({p.name for p in (tmp_path / "ray_train").iterdir()} - set(runs))
    assert len(new) == 1 and new[0].startswith("mkd_bpr_mkd_s0-"), new
    prec = {r["label"]: r["extra"].get("precision") for r in bf16["rows"]}
    assert prec["bpr_mkd"] == [["bf16"]] and prec["bpr_none"] is None
    assert [["fp32"]] == {r["label"]: r["extra"].get("precision") for r in again["rows"]}["bpr_mkd"]


def test_latency_smoke():
    from benchmarks.latency import main

    doc = _check_format(main(["--smoke"]))
    assert [r["extra"]["batch"] for r in doc["rows"]] == [1, 64]
    for r in doc["rows"]:  # the exported student ranks exactly like one matmul + topk
        assert r["extra"]["same_top_k_as_naive"] and r["extra"]["latency_ratio"] > 0
        assert r["timing"]["student_p50_ms"] <= r["timing"]["student_p90_ms"] <= r["timing"]["student_p99_ms"]
        assert r["extra"]["teacher_params"] == 10 * r["extra"]["student_params"]  # d=200 vs d=20
        assert r["extra"]["paired_ratio"] > 0


def test_latency_calls_are_interleaved_from_a_rotating_start():
    import torch

    from benchmarks.latency import timed

    calls = []
    fns = {n: (lambda u, n=n: calls.append(n)) for n in ("a", "b", "c")}
    quant, times = timed(fns, torch.arange(2), warmup=1, repeats=4, device=torch.device("cpu"))
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert "".join(calls[3:]) == "abc" + "bca" + "cab" + "abc"
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert set(quant["a"]) == {"p50_ms", "p90_ms", "p99_ms"}


def test_ranking_and_memory_smokes():
    from benchmarks.memory import main as memory
    from benchmarks.ranking import main as ranking

    (row,) = _check_format(ranking(["--smoke"]))["rows"]
    assert row["extra"]["users"] == 2000 and 0 < row["extra"]["matmul_ratio"] < 1.5
    rows = _check_format(memory(["--smoke"]))["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    # each of 2 workers holds half the rows: its table estimate halves, and so does its growth above the runtime
    assert rows[1]["extra"]["tables_estimate_mib"] == pytest.approx(rows[0]["extra"]["tables_estimate_mib"] / 2, rel=0.01)
    assert rows[0]["extra"]["above_base_ws2_vs_ws1_ratio"] < 0.65  # ~0.53 measured


def test_memory_workers_retry_when_their_port_is_taken(monkeypatch, capsys):
    import socket

    from benchmarks.sharded_teacher import measure_memory

    busy = socket.socket()  # a port someone else listens on, handed out as the first "free" one
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = [busy.getsockname()[1]]
    real = socket.socket

    class Picker(real):
        def getsockname(self):
            return ("127.0.0.1", ports.pop()) if ports else super().getsockname()

    monkeypatch.setattr(socket, "socket", Picker)
    try:
        m = measure_memory(1, 1000, 1000, 8, 1)
    finally:
        busy.close()
    assert m["peak_mib"] > 0 and len(m["ranks"]) == 1
    assert "retrying" in capsys.readouterr().out


@pytest.mark.ray
def test_data_path_smoke(ray_session):
    from benchmarks.data_path import main

    rows = {r["label"]: r for r in _check_format(main(["--smoke"]))["rows"]}
    assert set(rows) == {"synthetic_200000_pyarrow", "synthetic_200000_ray_w1"}
    # every row reached the loop once per epoch (checked inside), at a measured rate
    assert rows["synthetic_200000_ray_w1"]["extra"]["rows"] == 200_000
    assert 0 < rows["synthetic_200000_ray_w1"]["extra"]["ray_vs_pyarrow_ratio"] < 10
