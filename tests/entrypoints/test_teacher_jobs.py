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
    ("rank_teacher.py", ["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt: not a sharded teacher checkpoint"),
    ("train_teacher.py", ["model.sharding=none"], "train_teacher needs model.sharding"),
    ("train_teacher.py", ["model.dim=250"], "model.dim=250: fbgemm's fused embedding kernels need a multiple of 4"),
])
def test_teacher_job_errors_are_one_line(tmp_path, job, args, message):
    p = _run(job, "--config", TEACHER, f"storage_root={tmp_path}", *args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr, p.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing was written
