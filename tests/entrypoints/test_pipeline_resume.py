"""``jobs/main.py --resume``: a pipeline cut short in a student stage keeps the teacher, the ranking and the finished
student, and continues the interrupted student from its newest checkpoint; a changed stage config is refused."""

import json
from pathlib import Path

import pytest
import yaml

from rayrec.errors import ArtifactError, ConfigError, NonFiniteError

pytestmark = pytest.mark.ray


def _pipeline(tmp_path: Path, name: str, student_extra: list[str]) -> str:
    doc = {
        "name": "resumable", "base": ["data/ml100k"],
        "overrides": ["data.num_eval_negatives=99", "eval.full=false", "train.batch_size=512", "ray.num_workers=1"],
        "teacher": {"files": ["model/bpr_d200", "teacher/sharded_row_wise"],
                    "overrides": ["model.dim=32", "train.max_epochs=1"]},
        "rank": {"overrides": ["rank.top_n=50"]},
        "student": {"files": ["model/bpr_d20"], "overrides": ["train.max_epochs=2", "train.lr=0.01"]},
        "students": [{"label": "bpr_none"},
                     {"label": "bpr_de_rrd", "files": ["distill/de_rrd"],
                      "overrides": ["distill.de.M=4", *student_extra]}],
        "latency_users": 8,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_an_interrupted_pipeline_resumes_where_it_stopped(ray_session, tmp_path, capsys):
    from jobs.main import main

    root = f"storage_root={tmp_path}"
    clean = _pipeline(tmp_path, "clean.yaml", [])
    with pytest.raises(ArtifactError, match="no stage record of a pipeline named 'resumable'"):
        main(["--config", clean, root, "--resume"])  # nothing to resume yet: refused before any work

    # the second student's loss turns NaN in its second epoch (~100 steps an epoch): the run stops there, after
    # the teacher, the ranking, the first student and the second student's epoch-0 checkpoint
    faulty = _pipeline(tmp_path, "faulty.yaml", ["train.fault_step=150", "train.fault_kind=nan", "train.fault_rank=0"])
    with pytest.raises(NonFiniteError, match="step 150"):
        main(["--config", faulty, root])
    record = json.loads((tmp_path / "pipelines" / "resumable.stages.json").read_text())
    assert "summary" in record["teacher"] and "summary" in record["student bpr_none"]
    assert "summary" not in record["student bpr_de_rrd"] and not (tmp_path / "pipelines" / "resumable").exists()
    runs = lambda: sorted(p.name for p in (tmp_path / "ray_train").iterdir())  # noqa: E731
    before = runs()
    capsys.readouterr()

    with pytest.raises(ConfigError, match="teacher stage's config changed"):  # another learning rate everywhere
        main(["--config", clean, root, "train.lr=0.02", "--resume"])
    out = main(["--config", clean, root, "--resume"])
    printed = capsys.readouterr().out
    assert "[pipeline] teacher: finished before, kept" in printed and "kept (--resume)" in printed, printed
    assert "[pipeline] student bpr_none: finished before, kept" in printed
    assert "[pipeline] student bpr_de_rrd: continuing from" in printed
    # one new Ray Train run (the resumed student): the teacher was neither trained nor ranked again
    new = sorted(set(runs()) - set(before))
    assert len(new) == 1 and new[0].startswith("resumable_bpr_de_rrd-"), new
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["resumed"] is True
    student = json.loads((Path(manifest["students"]["bpr_de_rrd"]).parent / "summary.json").read_text())
    assert student["resumed_at"] == [1] and student["epochs_run"] == 2
    assert [h["epoch"] for h in student["history"]] == [0, 1] and student["metrics"]["test/H@5"] > 0.05
    rows = json.loads((out / "compare.json").read_text())
    assert set(rows) == {"bpr_teacher", "bpr_none", "bpr_de_rrd"}
