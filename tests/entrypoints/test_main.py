"""The README's main job: in-process on the shared Ray, and its error path as a real subprocess."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/pipelines/citeulike_demo.yaml")


@pytest.mark.ray
def test_main_job_runs_the_pipeline_and_writes_the_compare_report(ray_session, tmp_path, capsys):
    import json

    from jobs.main import main

    # the README's pipeline file unchanged, on MovieLens-100K (943 x 1682, 99 negatives) instead of CiteULike-t
    # (5k x 25k) so the suite stays fast: every stage, artifact and report is the same code path
    ml100k = ["data.dataset=ml-100k", "data.split=loo", "data.order=time", "data.rating_threshold=4.0",
              "data.min_user_interactions=5", "data.num_eval_negatives=99"]
    out = main(["--config", DEMO, "train.max_epochs=1", f"storage_root={tmp_path}", *ml100k])
    printed = capsys.readouterr().out
    assert out == tmp_path / "pipelines" / "citeulike_demo" and f"report: {out / 'compare.md'}" in printed
    md = (out / "compare.md").read_text()
    for label in ("bpr_teacher", "bpr_none", "bpr_de_rrd", "bpr_mkd"):
        assert f"| {label} " in md, md
    rows = json.loads((out / "compare.json").read_text())
    assert rows["bpr_teacher"]["num_parameters"] == 10 * rows["bpr_none"]["num_parameters"]  # d=200 vs d=20
    assert rows["bpr_mkd"]["size_ratio"] == pytest.approx(0.1)  # projectors and experts are not exported
    assert all(r["test/H@5"] > 0.08 for r in rows.values()), rows  # 1 epoch already beats random (5/100 = 0.05)
    assert rows["bpr_none"]["top20_p50_ms"] > 0 and (out / "compare.png").stat().st_size > 1000
    from rayrec.artifacts import read_manifest

    files = {f["path"] for f in read_manifest(out, "pipeline_report", "jobs/main.py", verify=True)["files"]}
    assert files == {"compare.md", "compare.json", "compare.png", "pipeline.json"}  # committed whole, checksummed
    manifest = json.loads((out / "pipeline.json").read_text())
    assert Path(manifest["ranking"], "manifest.json").exists() and Path(manifest["teacher_checkpoint"]).is_dir()
    # each student's Ray Train run: 2 workers hold the frozen row-sharded teacher and a DDP student; DE looks up the
    # teacher every step, RRD reads the ranking artifact; MKD's neighbour lists and top-N stream from the same
    # artifact and SLD recomputes the student's top-K at the epoch start
    runs = {k: json.loads((Path(v).parent / "summary.json").read_text()) for k, v in manifest["students"].items()}
    de_rrd, mkd = runs["bpr_de_rrd"], runs["bpr_mkd"]
    assert de_rrd["world_size"] == mkd["world_size"] == 2
    assert de_rrd["history"][0]["train/kd/de"] > 0 and de_rrd["history"][0]["train/kd/rrd"] > 0
    assert de_rrd["history"][0]["kd/tau"] == 1.0  # tau anneals from the end of epoch 1 on
    assert all(mkd["history"][0][f"train/kd/{t}"] > 0 for t in ("nkd", "cpd_fd", "cpd_list", "sld")), mkd["history"]
    assert 0 < mkd["history"][0]["kd/cpd_incon"] < 1
    import torch

    model = torch.load(Path(manifest["students"]["bpr_de_rrd"]) / "model.pt")
    assert model.keys() == {"user_emb.weight", "item_emb.weight"}  # experts and selection nets are not exported

    # benchmarks/train_speed.py --smoke on this teacher and ranking, plain loop only (its Ray runs are the ones above):
    # the student alone and DE-RRD in one process, the sharded teacher over a 1-rank gloo group
    from benchmarks.train_speed import main as speed

    tp, mc = speed([f"storage_root={tmp_path}", *ml100k, "--smoke", "--teacher-checkpoint",
                    manifest["teacher_checkpoint"], "--ranking", manifest["ranking"], "--methods", "none", "de_rrd",
                    "--workers", "0"])
    tput = {r["label"]: r for r in json.loads(tp.read_text())["rows"]}
    assert set(tput) == {"none_plain", "de_rrd_plain"} and all(r["timing"]["rows_per_s"] > 0 for r in tput.values())
    rows = {r["label"]: r for r in json.loads(mc.read_text())["rows"]}
    cost = {k: r["extra"]["epoch_ratio"] for k, r in rows.items() if k != "full_eval"}
    assert cost["none"] == 1.0 and cost["de_rrd"] > 1.0  # DE-RRD costs more than the student alone
    # its experts' FLOPs at this machine's matmul rate: a floor under the measured ratio
    floor = rows["de_rrd"]["extra"]
    assert floor["expert_gflop_per_epoch"] > 0 and floor["matmul_gflop_per_s"] > 0
    assert 0 < floor["flop_floor_ratio"] <= cost["de_rrd"]
    # no Ray run to take a student from: the full evaluation is timed on an untrained one of the same shape
    assert rows["full_eval"]["extra"]["eval_vs_student_epoch_ratio"] > 0
    assert rows["full_eval"]["extra"]["student"].startswith("untrained")
    assert not torch.distributed.is_initialized()  # the 1-rank group is gone with the run


def test_bad_config_fails_in_one_line_before_ray(tmp_path):
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs/main.py"), "--config", DEMO, "train.lrr=0.1", f"storage_root={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # exactly one line
    assert "train.lrr" in p.stderr and p.stderr.startswith("error: unknown config key"), p.stderr
    assert not (tmp_path / "prepared").exists()  # nothing was done
    assert time.perf_counter() - t0 < 60
