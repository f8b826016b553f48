"""Merging a benchmark's part files (one command per seed or method) into one result: seeds combined per row, the
newest part wins a seed measured twice, timings from any seed, missing rows named."""

import json
import time

import pytest


def _part(results, name, label, seeds, h5, timing, created):
    doc = {"benchmark": name, "command": f"python benchmarks/x.py --seeds {seeds}", "commit": "abc", "created": created,
           "machine": {}, "rows": [{"label": label, "seeds": seeds, "metrics": {}, "timing": timing,
                                    "extra": {"per_seed": [{"test/H@5": v} for v in h5], "best_epochs": [1] * len(h5)}}]}
    (results / f"{name}_{label}_s{'-'.join(map(str, seeds))}.json").write_text(json.dumps(doc))


def test_parts_merge_seed_by_seed(tmp_path, monkeypatch):
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "def")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _part(tmp_path, "bench", "bpr_de", [0], [0.40], {"epoch_s": 10.0}, "2026-01-01T00:00:00Z")
    _part(tmp_path, "bench", "bpr_de", [1, 2], [0.50, 0.60], {"epoch_s": 20.0, "epoch_median_s": 5.0}, now)
    _part(tmp_path, "bench", "bpr_de", [2], [0.70], {"epoch_s": 20.0}, "2026-12-31T00:00:00Z")  # newer: seed 2 redone
    _part(tmp_path, "bench", "bpr_teacher", [0], [0.9], {"epoch_s": 3.0}, now)
    out = common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd",
                                 expected=["bpr_teacher", "bpr_de", "bpr_rd"])
    doc = json.loads(out.read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert [r["label"] for r in doc["rows"]] == ["bpr_teacher", "bpr_de"]
    de = rows["bpr_de"]
    assert de["seeds"] == [0, 1, 2]
    assert de["metrics"]["test/H@5"] == pytest.approx((0.40 + 0.50 + 0.70) / 3)
    assert de["timing"]["epoch_s"] == pytest.approx((10 + 20 + 20) / 3, abs=1e-3)
    assert de["timing"]["epoch_median_s"] == 5.0  # only the seed whose part recorded it
    assert de["extra"]["complete"] and rows["bpr_teacher"]["extra"]["complete"]
    assert doc["missing"] == ["bpr_rd (0/3 seeds)"]
    assert len(doc["parts"]) == 4 and "Missing or short of seeds: bpr_rd" in out.with_suffix(".md").read_text()


def test_parts_of_different_teachers_are_refused(tmp_path, monkeypatch):
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "def")
    _part(tmp_path, "bench", "bpr_teacher", [0], [0.90], {"epoch_s": 3.0}, "2026-01-01T00:00:00Z")
    (tmp_path / "bench_bpr_teacher_s0.json").rename(tmp_path / "bench_a.json")
    _part(tmp_path, "bench", "bpr_teacher", [0], [0.90], {"epoch_s": 4.0}, "2026-01-02T00:00:00Z")  # same teacher
    (tmp_path / "bench_bpr_teacher_s0.json").rename(tmp_path / "bench_b.json")
    common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["bpr_teacher"])
    _part(tmp_path, "bench", "bpr_teacher", [0], [0.91], {"epoch_s": 3.0}, "2026-01-03T00:00:00Z")  # retrained
    with pytest.raises(ValueError, match=r"different teachers.*bench_a.json.*bench_b.json.*vs.*bench_bpr_teacher_s0"):
        common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["bpr_teacher"])


def test_parts_of_one_row_with_different_method_settings_are_refused(tmp_path, monkeypatch):
    """Seeds measured by separate commands merge only when they ran the same weights (extra.method_config)."""
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "def")

    def part(seed, lambda_c, created, old=False):
        _part(tmp_path, "bench", "bpr_mkd", [seed], [0.5], {"epoch_s": 1.0}, created)
        f = tmp_path / f"bench_bpr_mkd_s{seed}.json"
        doc = json.loads(f.read_text())
        if not old:  # a part written before the key existed has none
            doc["rows"][0]["extra"]["method_config"] = {"cpd": {"lambda_c": lambda_c}, "sld": {"tau": 0.25}}
        f.write_text(json.dumps(doc))

    part(0, 0.05, "2026-01-01T00:00:00Z")
    part(1, 0.05, "2026-01-02T00:00:00Z")
    part(2, 0.05, "2026-01-03T00:00:00Z", old=True)
    out = common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["bpr_mkd"])
    assert json.loads(out.read_text())["rows"][0]["seeds"] == [0, 1, 2]
    part(2, 1.0, "2026-01-04T00:00:00Z")  # seed 2 redone with CPD's stand-alone weight
    with pytest.raises(ValueError, match=r"different method settings.*bpr_mkd.*bench_bpr_mkd_s0.json.*vs.*_s2.json"):
        common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["bpr_mkd"])


def test_an_interrupted_benchmark_keeps_the_seeds_it_finished(tmp_path, monkeypatch):
    """derrd_citeulike writes its part after every seed: a run killed during seed 1 of a method keeps seed 0."""
    import benchmarks.common as common
    import benchmarks.derrd_citeulike as bench
    import rayrec.teacher.rank as rank
    import rayrec.train.fit as fit_mod

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)

    def summary(seed, h5):
        return {"metrics": {"test/H@5": h5}, "config": {"train": {"seed": seed}}, "world_size": 1,
                "timing": {"epoch_train_s": 1.0, "epoch_eval_s": 0.1}, "history": [{"time/train_s": 1.0}],
                "num_parameters": 10, "best_epoch": 3, "epochs_run": 5}

    ckpt = tmp_path / "teacher"
    ckpt.mkdir()
    (ckpt / "summary.json").write_text(json.dumps(summary(0, 0.5)))
    monkeypatch.setattr(rank, "rank_teacher", lambda cfg, ckpt, **kw: str(tmp_path / "ranking"))

    def fake_fit(cfg):
        if cfg.train.seed == 1:
            raise KeyboardInterrupt  # the run is killed during seed 1
        return summary(cfg.train.seed, 0.4)

    monkeypatch.setattr(fit_mod, "fit", fake_fit)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", "bpr", "--methods", "de", "--seeds", "0", "1", "--teacher-checkpoint", str(ckpt),
                    "--out", "derrd_citeulike_part"])
    doc = json.loads((tmp_path / "derrd_citeulike_part.json").read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"bpr_teacher", "bpr_de"} and rows["bpr_de"]["seeds"] == [0]
    assert rows["bpr_de"]["metrics"]["test/H@5"] == 0.4 and not rows["bpr_de"]["extra"]["complete"]


def test_the_projectors_precision_is_kept_per_seed(tmp_path, monkeypatch):
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "def")
    _part(tmp_path, "bench", "bpr_mkd", [0], [0.40], {"epoch_s": 80.0}, "2026-01-01T00:00:00Z")  # before the key
    _part(tmp_path, "bench", "bpr_mkd", [1, 2], [0.5, 0.6], {"epoch_s": 35.0}, "2026-02-01T00:00:00Z")
    doc_path = tmp_path / "bench_bpr_mkd_s1-2.json"
    doc = json.loads(doc_path.read_text())
    doc["rows"][0]["extra"]["precision"] = [["bf16"], ["bf16"]]
    doc_path.write_text(json.dumps(doc))
    out = common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["bpr_mkd"])
    row = json.loads(out.read_text())["rows"][0]
    assert row["extra"]["precision"] == [None, ["bf16"], ["bf16"]]
    assert common.precision_label(row) == "fp32 (seed 0), bf16 (seeds 1, 2)"
    assert common.precision_label({**row, "extra": {**row["extra"], "precision": [["bf16"]] * 3}}) == "bf16"


def test_the_student_alone_keeps_its_seeds_when_the_teacher_is_retrained(tmp_path, monkeypatch):
    """A part of the teacher and the student alone (method none, which reads no teacher) merges with parts distilled
    from a retrained teacher: its teacher row is left out (marked), its student rows kept. Parts that distilled
    different teachers are still refused."""
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "def")

    def part(file, created, rows):
        doc = {"benchmark": "bench", "command": f"cmd {file}", "commit": "abc", "created": created, "machine": {},
               "rows": [{"label": label, "method": method, "seeds": [0], "metrics": {}, "timing": {"epoch_s": 1.0},
                         "extra": {"per_seed": [{"test/H@5": v}], "best_epochs": [1]}} for label, method, v in rows]}
        (tmp_path / f"bench_{file}.json").write_text(json.dumps(doc))

    part("old", "2026-01-01T00:00:00Z", [("lgcn_teacher", "teacher", 0.90), ("lgcn_none", "none", 0.50)])
    part("sld", "2026-01-02T00:00:00Z", [("lgcn_teacher", "teacher", 0.91), ("lgcn_sld", "sld", 0.95)])
    out = common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd",
                                 expected=["lgcn_teacher", "lgcn_none", "lgcn_sld"], min_seeds=1)
    doc = json.loads(out.read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["lgcn_teacher"]["metrics"]["test/H@5"] == 0.91  # the teacher the distilled rows read
    assert rows["lgcn_teacher"]["extra"]["parts_of_seeds"] == ["bench_sld.json"]
    assert rows["lgcn_none"]["metrics"]["test/H@5"] == 0.50 and rows["lgcn_sld"]["metrics"]["test/H@5"] == 0.95
    unused = {p["file"]: p.get("teacher_row_unused") for p in doc["parts"]}
    assert unused == {"bench_old.json": ["lgcn_teacher"], "bench_sld.json": None}
    assert "lgcn_teacher row not used" in out.with_suffix(".md").read_text()
    # a distilled row beside the student alone: that part read its teacher, so the teachers must agree
    part("old", "2026-01-01T00:00:00Z", [("lgcn_teacher", "teacher", 0.90), ("lgcn_none", "none", 0.50),
                                         ("lgcn_rd", "rd", 0.6)])
    with pytest.raises(ValueError, match="different teachers"):
        common.aggregate_parts("bench", ["test/H@5"], lambda rows: "table", "cmd", expected=["lgcn_teacher"])
