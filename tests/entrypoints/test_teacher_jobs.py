"""The teacher jobs refuse bad input in one line before starting Ray (their Ray paths: tests/train/test_fit.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEACHER = str(REPO / "configs/experiments/citeulike__bpr_teacher.yaml")


def _run(job, *args):
    return subprocess.run([sys.executable, str(REPO / "jobs" / job), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize("job, args, message", [
    ("rank_teacher.py", ["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt: checkpoint not found; run jobs/train_teacher.py"),
    ("train_teacher.py", ["model.sharding=none"], "train_teacher needs model.sharding"),
    ("train_teacher.py", ["model.dim=250"], "model.dim=250: fbgemm's fused embedding kernels need a multiple of 4"),
])
def test_teacher_job_errors_are_one_line(tmp_path, job, args, message):
    p = _run(job, "--config", TEACHER, f"storage_root={tmp_path}", *args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr, p.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("job, args, message", [
    # a missing artifact, named, before any work
    ("distill.py", ["--config", str(REPO / "configs/experiments/citeulike__bpr_d200_to_d20__de_rrd.yaml"),
                    "distill.teacher.checkpoint=/nonexistent/ckpt"], "/nonexistent/ckpt: checkpoint not found; run jobs/train_teacher.py"),
    ("export.py", ["--checkpoint", "/nonexistent/run", "--out", "x"], "/nonexistent/run: checkpoint not found; run the training job"),
    ("evaluate.py", ["--checkpoint", "/nonexistent/run"], "/nonexistent/run: checkpoint not found; run the training job"),
    ("benchmark.py", ["nope"], "unknown benchmark 'nope'"),
    # a wrong cluster address: refused within seconds instead of Ray's minutes of retries
    ("prepare_data.py", ["--config", str(REPO / "configs/data/ml100k.yaml"), "ray.address=127.0.0.1:1"], None),
    ("distill.py", ["--config", str(REPO / "configs/data/ml100k.yaml"), "ray.address=127.0.0.1:1"],
     "ray: no cluster answers at '127.0.0.1:1'"),
])
def test_job_errors_are_one_line_before_any_work(tmp_path, job, args, message):
    p = _run(job, *args, *([f"storage_root={tmp_path}"] if "--config" in args else []))
    if message is None:  # prepare_data needs no cluster: it works whatever the address
        assert p.returncode == 0, p.stderr[-2000:]
        return
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr, p.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing was written
