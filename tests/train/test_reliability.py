"""Reliability of the training loop on real (small) data: a worker process killed mid-epoch, repeatable runs, and
non-finite losses that stop the run with the step and the loss terms named."""

import json
from pathlib import Path

import pytest

from _ml100k import ml100k_config

from rayrec.errors import ConfigError, NonFiniteError
from rayrec.train.fit import fit, validate

pytestmark = pytest.mark.ray


def _cfg(tmp, *overrides):
    return ml100k_config(tmp, "name=rel", "eval.full=false", *overrides)


def test_killed_worker_restarts_from_its_checkpoint_and_the_run_repeats(ray_session, prepared, tmp_path):
    run = ["train.max_epochs=4", "ray.num_workers=2", "train.patience=10", "eval.full=true", "eval.full_ks=[10]"]
    # run a syncs the embedding gradients with DDP's dense all-reduce (the default), run k (below) only the rows each
    # step touched (train.grad_sync=rows): with 2 workers the gradients are bit-equal, so the runs must repeat
    a = fit(_cfg(tmp_path / "a", *run), prepared=prepared)
    assert a["resumed_at"] == [] and a["world_size"] == 2 and a["epochs_run"] == 4
    assert "train/sync_rows_per_step" not in a["history"][0]
    # 2 DDP workers learn: random ranking gives H@10 = 10/100, a few epochs of BPR on ML-100K are far above it
    assert a["metrics"]["test/H@10"] > 0.3, a["metrics"]
    assert 0 < a["metrics"]["full/Recall@10"] <= 1
    assert a["history"][-1]["train/loss"] < a["history"][0]["train/loss"]
    assert all(h["train/rows_per_s"] > 0 for h in a["history"])
    # every epoch's report carried a checkpoint with the metrics; the final one holds the best model + summary
    import ray

    result = ray.train.Result.from_path(a["run_dir"])
    assert len(result.best_checkpoints) >= 2
    assert "valid/H@5" in result.best_checkpoints[0][1] or "final/test/H@5" in result.best_checkpoints[0][1]
    final = Path(a["checkpoint"])
    assert (final / "model.pt").exists()  # the best epoch's weights
    assert json.loads((final / "summary.json").read_text())["best_epoch"] == a["best_epoch"]
    assert json.loads((Path(a["run_dir"]) / "summary.json").read_text())["metrics"] == a["metrics"]

    # rank 1 exits hard (os._exit) in the middle of the last epoch (Ray Train registers a reported checkpoint
    # within its 2 s health-check interval, so earlier epochs' checkpoints are registered by then): both workers
    # restart from the last registered checkpoint and the run finishes its 4 epochs
    per_epoch = a["steps"] // 4  # ML-100K: ~51k train rows, 512 per step -> ~100 steps an epoch
    fault = 3 * per_epoch + per_epoch // 2
    k = fit(_cfg(tmp_path / "k", *run, f"train.fault_step={fault}", "train.fault_rank=1", "train.max_failures=1",
                 "train.grad_sync=rows"), prepared=prepared)
    marker = Path(k["run_dir"]) / ".fault_injected"
    assert marker.read_text().startswith(f"rank 1 exited at step {fault}")
    assert len(k["resumed_at"]) == 1 and 1 <= k["resumed_at"][0] <= 3, k["resumed_at"]
    assert [h["epoch"] for h in k["history"]] == [0, 1, 2, 3] and k["steps"] == a["steps"]
    # 256 rows a rank a step (1 negative each): at most 256 users of 943 and 512 items of 1682, sent sparsely
    assert all(0 < h["train/sync_rows_per_step"] <= 256 + 512 for h in k["history"]), k["history"][0]
    quality = lambda h: {m: v for m, v in h.items()  # noqa: E731
                         if not m.startswith(("time/", "train/sync")) and m != "train/rows_per_s"}
    # determinism: run k's epochs before the fault were trained from scratch in another run, with the same seed,
    # world size and data, and equal run a's; the restarted epochs replay a's data order too (Ray Data reseeds per
    # execution), so every epoch and the final metrics repeat exactly
    assert [quality(h) for h in k["history"]] == [quality(h) for h in a["history"]]
    assert abs(k["metrics"]["test/H@5"] - a["metrics"]["test/H@5"]) <= 0.005, (k["metrics"], a["metrics"])
    assert k["metrics"] == a["metrics"]


@pytest.mark.slow  # ~20 s; Ray Train's own behaviour with max_failures=0
def test_without_retries_a_killed_worker_fails_the_run(ray_session, prepared, tmp_path):
    with pytest.raises(Exception, match="(?i)worker|actor|died|exit"):
        fit(_cfg(tmp_path, "train.max_epochs=1", "ray.num_workers=2", "train.fault_step=3", "train.max_failures=0"),
            prepared=prepared)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_loss_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(kind, ray_session, prepared,
                                                                                     tmp_path):
    # rank 1's loss turns NaN (its gradients too) or +inf (its gradients stay finite) in epoch 1: both ranks stop at
    # that step (none hangs in a collective), the error names the step and every rank's loss terms, and the epoch-0
    # checkpoint is the last one. No per-step collective carries the flag: rank 1's gradients, all-reduced by DDP
    with pytest.raises(NonFiniteError) as e:
        fit(_cfg(tmp_path, "train.max_epochs=3", "ray.num_workers=2", "train.fault_step=150", "train.fault_rank=1",
                 f"train.fault_kind={kind}"), prepared=prepared)
    msg = str(e.value)
    assert "non-finite loss at epoch 1, step 150" in msg and f"rank 1: base={kind}" in msg, msg
    assert "rank 0: base=" in msg and f"rank 0: base={kind}" not in msg
    last = Path(msg.rsplit("last good checkpoint: ", 1)[1])
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1  # epoch 0's checkpoint; epoch 1 was never saved
    assert [p.name for p in last.parent.glob("checkpoint_2*")] == [last.name]


def test_overflowing_scores_stop_the_first_step(ray_session, prepared, tmp_path):
    # embeddings of ~1e19: 20-dim dot products overflow float32 to inf and the BPR loss is not finite at step 0
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient) at epoch 0, step 0 .*rank 0: base=.*"
                                             r"last good checkpoint: none \(first epoch\)"):
        fit(_cfg(tmp_path, "train.max_epochs=1", "ray.num_workers=0", "model.init_std=1e19"), prepared=prepared)


def test_fault_injection_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="fault_rank=2 but ray.num_workers=2"):
        validate(_cfg(tmp_path, "train.fault_step=1", "train.fault_rank=2", "ray.num_workers=2"))
    with pytest.raises(ConfigError, match="needs ray.num_workers >= 1"):
        validate(_cfg(tmp_path, "train.fault_step=1", "train.fault_rank=0", "ray.num_workers=0"))
    with pytest.raises(ConfigError, match="max_failures must be >= -1"):
        _cfg(tmp_path, "train.max_failures=-2")
