"""The tune job: a tiny real search (2 trials x 1 epoch through Ray Train) writes its report, and its best.yaml
runs unchanged through the distill job; a bad search space fails in one line before Ray."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path, space, **kw) -> Path:
    doc = {"name": "tiny", "config": ["data/ml100k", "model/bpr_d20"],
           "overrides": [f"storage_root={tmp_path}", "model.dim=8", "train.max_epochs=1", "ray.num_workers=1",
                         "data.num_eval_negatives=99", "eval.full_ks=[10]", "eval.full=false"],
           "metric": "valid/H@10", "mode": "max", "num_samples": 2, "grace_period": 1, "space": space, **kw}
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _trial_spans(history: Path) -> dict[str, tuple[float, float]]:
    """(start, end) wall time of each trial from its reports (Tune's integer ``timestamp`` minus ``time_total_s``)."""
    import json

    spans: dict[str, tuple[float, float]] = {}
    for line in history.read_text().splitlines():
        r = json.loads(line)
        start, end = r["timestamp"] - r["time_total_s"], r["timestamp"]
        s0, e0 = spans.get(r["trial"], (start, end))
        spans[r["trial"]] = (min(s0, start), max(e0, end))
    return spans


@pytest.mark.ray
def test_tiny_tune_writes_a_report_and_a_best_config_distill_accepts(ray_session, tmp_path):
    from jobs.distill import main as distill
    from jobs.tune import main as tune

    spec = _spec(tmp_path, {"train.lr": {"loguniform": [0.001, 0.01]}, "train.weight_decay": {"choice": [0.0, 0.001]}})
    out = tune(["--config", str(spec)])
    assert out == tmp_path / "tune" / "tiny" / "report"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(0 < float(r["valid/H@10"]) <= 1 for r in rows)
    assert all(0.001 <= float(r["train.lr"]) <= 0.01 for r in rows)
    # max_concurrent (default 1) holds: the trials ran one after the other, never side by side
    spans = sorted(_trial_spans(tmp_path / "tune" / "tiny.history.jsonl").values())
    assert len(spans) == 2 and spans[1][0] >= spans[0][1] - 1.5, spans
    md = (out / "report.md").read_text()
    assert "Best:" in md and "param_train_lr.png" in md and "learning_curves.png" in md
    for png in ("param_train_lr.png", "param_train_weight_decay.png", "learning_curves.png", "best_terms.png"):
        assert (out / png).stat().st_size > 1000, png
    from rayrec.artifacts import read_manifest

    committed = {f["path"] for f in read_manifest(out, "tune_report", "jobs/tune.py", verify=True)["files"]}
    assert {"report.md", "results.csv", "best.yaml", "learning_curves.png"} <= committed
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == pytest.approx(float(max(rows, key=lambda r: float(r["valid/H@10"]))["train.lr"]))
    s = distill(["--config", str(out / "best.yaml"), f"storage_root={tmp_path}/again"])
    assert s["metrics"]["test/H@10"] > 0.1
    # --resume restores the experiment (Tuner.restore): nothing left to run, the same report is rebuilt
    (out / "report.md").unlink()
    assert tune(["--config", str(spec), "--resume"]) == out
    assert list(csv.DictReader(open(out / "results.csv"))) == rows and (out / "report.md").exists()


@pytest.mark.ray
def test_optuna_searcher_learns_from_past_trials(ray_session, tmp_path, monkeypatch):
    from jobs.tune import main as tune

    spec = _spec(tmp_path, {"train.lr": {"loguniform": [0.001, 0.01]}}, searcher="optuna", scheduler="fifo")
    monkeypatch.chdir(tmp_path)  # a relative storage root means the driver's cwd, not each trial's own
    out = tune(["--config", str(spec), "storage_root=store"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and "searcher optuna" in (out / "report.md").read_text()
    assert out == tmp_path / "store" / "tune" / "tiny" / "report"
    assert len(list((tmp_path / "store" / "ray_train").glob("tiny_*"))) == 2  # each trial's Train run


@pytest.mark.ray
def test_a_worker_killed_inside_a_trial_restarts_from_its_checkpoint(ray_session, tmp_path):
    """A Tune trial's TorchTrainer loses rank 1 (``os._exit``) in its second epoch: Ray Train restarts the trial's
    worker group from the epoch-0 checkpoint, the trial finishes, and its metrics equal an uninterrupted run's."""
    import json

    from rayrec.train.fit import fit
    from rayrec.tune import load_spec, run_tune, trial_config

    run = ["ray.num_workers=2", "train.max_epochs=2", "train.batch_size=512", "train.max_failures=1"]
    fault = ["train.fault_step=150", "train.fault_rank=1"]  # ~100 steps an epoch: the middle of epoch 1
    spec_path = _spec(tmp_path, {"train.lr": {"choice": [0.01]}}, num_samples=1, scheduler="fifo")
    spec = load_spec(spec_path, [*run, *fault])
    out = run_tune(spec, progress=lambda s: None)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and rows[0]["error"] == "" and int(rows[0]["epochs"]) == 2, rows
    (trial_run,) = (tmp_path / "ray_train").glob("tiny_*")  # the trial's Ray Train run
    assert (trial_run / ".fault_injected").read_text().startswith("rank 1 exited at step 150")
    killed = json.loads((trial_run / "summary.json").read_text())
    assert killed["resumed_at"] == [1] and [h["epoch"] for h in killed["history"]] == [0, 1]
    # the same trial config, uninterrupted, outside Tune
    ref = fit(trial_config(load_spec(spec_path, run), {"train.lr": 0.01}, [f"storage_root={tmp_path}/ref"]),
              progress=lambda s: None)
    assert abs(killed["metrics"]["test/H@5"] - ref["metrics"]["test/H@5"]) <= 0.005
    assert killed["metrics"] == ref["metrics"]


def test_bad_search_space_fails_in_one_line_before_ray(tmp_path):
    spec = _spec(tmp_path, {"train.lr": {"loguniform": [0.01, 0.001]}})
    p = subprocess.run([sys.executable, str(REPO / "jobs/tune.py"), "--config", str(spec)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: invalid search space: train.lr") and not (tmp_path / "tune").exists()
    spec = _spec(tmp_path, {"train.lrr": {"choice": [0.1]}})
    p = subprocess.run([sys.executable, str(REPO / "jobs/tune.py"), "--config", str(spec)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "unknown config key 'train.lrr'" in p.stderr


SLD_SPACE = {"distill.sld.lambda_s": {"choice": [1.0, 5.0, 20.0, 50.0]},
             "distill.sld.tau": {"choice": [0.5, 1.0, 2.0, 5.0]}, "distill.sld.K": {"choice": [50, 100]},
             "train.weight_decay": {"choice": [0.001, 0.0001, 0.00001]}}


def test_a_finite_space_is_sampled_without_repeats():
    from rayrec.tune import distinct_choices

    points = distinct_choices(SLD_SPACE, 12, seed=0)
    combos = [tuple(p.values()) for p in points]
    assert len(set(combos)) == 12 and all(list(p) == list(SLD_SPACE) for p in points)
    assert all(p[k] in SLD_SPACE[k]["choice"] for p in points for k in p)
    assert distinct_choices(SLD_SPACE, 12, seed=0) == points and distinct_choices(SLD_SPACE, 12, seed=1) != points
    every = distinct_choices(SLD_SPACE, 200, seed=0)  # more trials than combinations: each combination once
    assert len(every) == 96 and len({tuple(p.values()) for p in every}) == 96
    huge = {f"k{i}": {"choice": list(range(10))} for i in range(7)}  # 10^7 combinations: the rejection path
    assert len({tuple(p.values()) for p in distinct_choices(huge, 50, seed=0)}) == 50
    assert distinct_choices({**SLD_SPACE, "train.lr": {"loguniform": [1e-4, 1e-2]}}, 12, seed=0) is None


@pytest.mark.ray
def test_the_random_searcher_never_repeats_a_trial_of_a_finite_space(ray_session, tmp_path):
    """Ray's own generator (seed 0) repeats 2 of its first 8 configurations of this space; the searcher rayrec
    builds runs 8 different ones, and a space smaller than num_samples runs each combination once."""
    from ray import tune

    from rayrec.tune import TuneSpec, _domain, _searcher

    def trainable(config):
        return {"score": 1.0}

    def configs(space, n):
        spec = TuneSpec(name="distinct", num_samples=n, space=space)
        search, num_samples = _searcher(spec, progress=lambda s: None)
        grid = tune.Tuner(trainable, param_space={k: _domain(k, e)[0] for k, e in space.items()},
                          tune_config=tune.TuneConfig(num_samples=num_samples, search_alg=search),
                          run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"d{n}", verbose=0)).fit()
        return [tuple(r.config[k] for k in space) for r in grid]

    got = configs(SLD_SPACE, 8)
    assert len(got) == 8 and len(set(got)) == 8
    small = {"a": {"choice": [1, 2]}, "b": {"choice": ["x", "y"]}}
    got = configs(small, 5)
    assert sorted(got) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
