"""The README's main job: in-process on the shared Ray, and its error path as a real subprocess."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/experiments/citeulike__bpr_demo.yaml")


@pytest.mark.ray
def test_main_job_prints_teacherless_table(ray_session, tmp_path, capsys):
    from jobs.main import main

    s = main(["--config", DEMO, "train.max_epochs=1", f"storage_root={tmp_path}"])
    out = capsys.readouterr().out
    assert "| bpr_d20 (student alone)" in out and "test/H@5" in out and "full/Recall@20" in out
    assert s["metrics"]["test/H@5"] > 0.05  # 1 epoch of BPR already beats random (5/500 = 0.01)
    assert (tmp_path / "prepared").is_dir() and Path(s["run_dir"], "summary.json").exists()


def test_bad_config_fails_in_one_line_before_ray(tmp_path):
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs/main.py"), "--config", DEMO, "train.lrr=0.1", f"storage_root={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # exactly one line
    assert "train.lrr" in p.stderr and p.stderr.startswith("error: unknown config key")
    assert not (tmp_path / "prepared").exists()  # nothing was done
    assert time.perf_counter() - t0 < 60
