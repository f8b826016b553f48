"""Training through Ray Train on real (small) data: 2 DDP workers, local mode loop logic, resume, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _ml100k import ml100k_config

from rayrec.config import CONFIG_DIR, RayConfig
from rayrec.data.prepared import load_prepared
from rayrec.errors import ArtifactError, ConfigError
from rayrec.runtime import check_resources
from rayrec.train.fit import fit, validate

pytestmark = pytest.mark.ray


def _cfg(tmp, *overrides):
    return ml100k_config(tmp, "name=t", "eval.full_ks=[10]", *overrides)


def _check_fit_or_resume(cfg, first, prepared, tmp_path):
    """fit_or_resume on the finished 1-worker run ``first`` of ``cfg`` (2 epochs; its 2 per-epoch checkpoints and
    the final one kept)."""
    from rayrec.train.fit import find_resumable, fit_or_resume

    run = Path(first["run_dir"])
    assert (run / "run.json").exists()
    # the same config again: the finished run is kept, nothing trains; workers and storage are not what is trained
    assert fit_or_resume(cfg, prepared=prepared)["run_dir"] == first["run_dir"]
    two = _cfg(tmp_path, "train.max_epochs=2", "ray.num_workers=2", "train.num_to_keep=3")
    assert find_resumable(two)[0] == "finished"
    assert find_resumable(_cfg(tmp_path, "train.max_epochs=2", "ray.num_workers=1", "train.lr=0.5")) is None
    # a run recorded before an option existed (its config lacks the key) is the same run while the option keeps
    # its default; a recorded value other than the default is another run
    summary, record = (json.loads((run / f).read_text()) for f in ("summary.json", "run.json"))
    for rec in (summary["config"], record["config"]):
        assert rec["distill"]["de"].pop("precision") == "fp32"
    (run / "summary.json").write_text(json.dumps({**summary, "config": {**summary["config"], "train": {
        **summary["config"]["train"], "lr": 0.5}}}))
    assert find_resumable(cfg) is None
    (run / "summary.json").write_text(json.dumps(summary))
    assert find_resumable(cfg)[0] == "finished"
    (run / "run.json").write_text(json.dumps(record))
    # interrupt it after the fact: no summary, its newest checkpoint cut short (its manifest not yet written)
    (run / "summary.json").unlink()
    ckpts = sorted(p.parent for p in run.glob("checkpoint_*/state.json"))
    assert len(ckpts) == 2
    for m in ckpts[-1].glob("manifest.rank*.json"):
        m.unlink()
    assert find_resumable(cfg) == ("continue", ckpts[0])
    resumed = fit_or_resume(cfg, prepared=prepared)  # continues at epoch 1: trains epoch 1 again, as the run did
    assert resumed["run_dir"] != first["run_dir"] and resumed["resumed_at"] == [1] and resumed["epochs_run"] == 2
    assert [h["train/loss"] for h in resumed["history"]] == [h["train/loss"] for h in first["history"]]


def test_local_mode_early_stopping_and_resume(ray_session, prepared, tmp_path):
    # lr so small that nothing improves after the first epoch: stops after 1 + patience epochs
    cfg = _cfg(tmp_path, "train.lr=1e-12", "train.weight_decay=0", "train.patience=2", "train.max_epochs=50",
               "ray.num_workers=0")
    s = fit(cfg, prepared=prepared)
    assert s["stopped_early"] and s["epochs_run"] == 3 and s["best_epoch"] == 0

    assert (Path(s["run_dir"]) / "summary.json").exists()

    # resume needs persisted checkpoints, which local mode does not write: one real worker
    cfg2 = _cfg(tmp_path, "train.max_epochs=2", "ray.num_workers=1", "train.num_to_keep=3")
    first = fit(cfg2, prepared=prepared)
    ckpts = sorted(p for p in Path(first["run_dir"]).glob("checkpoint_*") if (p / "state.json").exists())
    assert ckpts, "per-epoch checkpoints with training state"
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["epoch"] == 2
    # the distill job with --resume finds that newest checkpoint of the run name under the storage root
    from jobs.distill import main as distill
    from rayrec.train.fit import latest_checkpoint

    assert latest_checkpoint(cfg2) == ckpts[-1]
    files = ["--config", str(CONFIG_DIR / "data/ml100k.yaml"), "--config", str(CONFIG_DIR / "model/bpr_d20.yaml")]
    resumed = distill([*files, "--resume", f"storage_root={tmp_path}", "name=t", "train.batch_size=512",
                       "train.lr=0.01", "data.num_eval_negatives=99", "eval.full_ks=[10]", "train.max_epochs=3",
                       "ray.num_workers=1"])
    assert resumed["epochs_run"] == 3 and resumed["resumed_at"] == [2]
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]  # history carried over, one new epoch
    assert resumed["history"][:2] == first["history"]
    _check_fit_or_resume(cfg2, first, prepared, tmp_path)


def test_config_errors_before_ray(tmp_path):
    from jobs.distill import main as distill

    with pytest.raises(ArtifactError, match="--resume: no checkpoint of a run named 'nothing_here'"):
        distill(["--config", str(CONFIG_DIR / "data/ml100k.yaml"), "--resume", f"storage_root={tmp_path}",
                 "name=nothing_here"])
    with pytest.raises(ConfigError, match="train.monitor"):
        validate(_cfg(tmp_path, "train.monitor=full_valid/NDCG@10"))
    with pytest.raises(ConfigError, match="split=ratio"):
        validate(_cfg(tmp_path, "data.split=ratio"))
    with pytest.raises(ConfigError, match="deadlock"):
        check_resources(RayConfig(num_workers=2, cpus_per_worker=1.0), num_cpus=2)
    check_resources(RayConfig(num_workers=2, cpus_per_worker=1.0), num_cpus=4)


def test_neumf_bce_trains_in_local_mode(ray_session, prepared, tmp_path):
    cfg = _cfg(tmp_path, "model.name=neumf", "model.dim=8", "train.max_epochs=2", "ray.num_workers=0")
    s = fit(cfg, prepared=prepared)
    assert s["num_parameters"] == 2 * (938 + 1447) * 8 + (2 * 8 * 8 + 8) + (2 * 8 + 1)
    assert s["history"][1]["train/loss"] < s["history"][0]["train/loss"]
    assert s["metrics"]["test/H@10"] > 0.15  # random: 0.10


def test_lightgcn_trains_in_local_mode(ray_session, prepared, tmp_path):
    cfg = _cfg(tmp_path, "model.name=lightgcn", "model.dim=8", "model.layers=2", "model.init_std=0.1",
               "train.max_epochs=2", "train.weight_decay=0", "ray.num_workers=0")
    s = fit(cfg, prepared=prepared)
    assert s["num_parameters"] == (938 + 1447) * 8  # the graph is not a parameter
    assert s["history"][1]["train/loss"] < s["history"][0]["train/loss"]
    assert s["metrics"]["test/H@10"] > 0.15 and 0 < s["metrics"]["full/Recall@10"] <= 1


def test_sharded_teacher_trains_checkpoints_shards_and_resumes_on_fewer_workers(ray_session, prepared, tmp_path):
    # a per-worker table budget that one worker cannot meet: refused at 1 worker, trains at 2
    # (BPR d=20: (938 + 1447) x (20 + 1) x 4 B = 0.191 MiB with row-wise Adagrad state; half of it per worker)
    budget = ["model.table_budget_mb=0.15"]
    with pytest.raises(ConfigError, match=r"0.2 MiB per worker .* ray.num_workers=1, over model.table_budget_mb=0.15; "
                                          r"use ray.num_workers >= 2"):
        fit(_cfg(tmp_path, "model.sharding=row_wise", "ray.num_workers=1", *budget), prepared=prepared)
    cfg = _cfg(tmp_path, "model.sharding=row_wise", "train.lr=0.1", "train.weight_decay=0", "train.max_epochs=2",
               "ray.num_workers=2", "train.num_to_keep=3", *budget)
    s = fit(cfg, prepared=prepared)
    assert s["num_parameters"] == (938 + 1447) * 20  # global table sizes, not this rank's shard
    assert s["metrics"]["test/H@10"] > 0.2, s["metrics"]  # random: 0.10
    assert 0 < s["metrics"]["full/Recall@10"] <= 1  # distributed full ranking over the row-sharded item table
    final = Path(s["checkpoint"])
    assert (final / "model" / ".metadata").exists()
    assert sorted(p.name for p in (final / "model").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    first = sorted(p for p in Path(s["run_dir"]).glob("checkpoint_*") if (p / "state.json").exists())[0]
    assert json.loads((first / "state.json").read_text())["epoch"] == 1

    # distributed ranking of the trained teacher (2 workers, row blocks) equals brute force on its dense export
    from rayrec.sharding.checkpoint import export_dense
    from rayrec.teacher.rank import load_ranking, rank_teacher

    rcfg = _cfg(tmp_path, "model.sharding=row_wise", "ray.num_workers=2", "rank.top_n=50", "rank.user_chunk=200",
                "rank.item_neighbors=5", "rank.user_neighbors=5", "rank.neighbor_pca=0", "rank.neighbor_metric=cosine")
    out = rank_teacher(rcfg, final, prepared=prepared)
    rk = load_ranking(out, verify=True)
    assert rk.manifest["counts"] == {"topn": 938, "user_neighbors": 938, "item_neighbors": 1447}
    assert rk.manifest["world_size"] == 2
    dense = export_dense(final)
    scores = dense["model.ec.embeddings.user.weight"] @ dense["model.ec.embeddings.item.weight"].T  # [U, I]
    train = np.zeros(scores.shape, dtype=bool)
    pd_ = load_prepared(prepared)
    train[pd_.train_user, pd_.train_item] = True
    scores[torch.from_numpy(train)] = -torch.inf
    want = torch.topk(scores, 50, dim=1).values.numpy()
    np.testing.assert_allclose(rk.scores, want, rtol=1e-4, atol=1e-5)
    assert not np.take_along_axis(train, rk.items, 1).any()  # never a train item
    nb, _ = rk.neighbors("item")
    assert nb.shape == (1447, 5) and not (nb == np.arange(1447)[:, None]).any()

    # distillation from this teacher on 2 workers (DE-RRD, MKD) runs in tests/entrypoints/test_main.py's pipeline
    teacher = ["distill.teacher.checkpoint=" + str(final), f"distill.teacher.ranking={out}", "distill.teacher.dim=20"]
    # a teacher checkpoint whose tables do not match the config is refused before Ray, naming the key
    with pytest.raises(ConfigError, match=r"distill.teacher.dim=16 but the teacher checkpoint .* has tables of d=20"):
        validate(_cfg(tmp_path, "model.dim=8", "distill.method=de", *teacher[:2], "distill.teacher.dim=16"))
    with pytest.raises(ConfigError, match=r"model.dim=32 but the teacher checkpoint"):
        rank_teacher(_cfg(tmp_path, "model.sharding=row_wise", "model.dim=32", "ray.num_workers=2"), final,
                     prepared=prepared)
    # RRD alone needs no teacher lookups: it also runs in local mode
    r = fit(_cfg(tmp_path, "model.dim=8", "distill.method=rrd", "distill.rrd.interesting=top", "train.max_epochs=1",
                 "ray.num_workers=0", "eval.full=false", *teacher), prepared=prepared)
    assert r["history"][0]["train/kd/rrd"] > 0 and "train/kd/de" not in r["history"][0]
    # the teacher held dense in each of 2 workers (distill.teacher.sharding=dense: no TorchRec lookups) teaches DE
    # through Ray Train like the sharded one
    d = fit(_cfg(tmp_path, "model.dim=8", "distill.method=de", "distill.teacher.sharding=dense", "train.max_epochs=1",
                 "ray.num_workers=2", "eval.full=false", *teacher), prepared=prepared)
    assert d["world_size"] == 2 and d["history"][0]["train/kd/de"] > 0
    # a checkpoint written by 2 workers resumes on 1 (DCP reshards on load)
    cfg1 = _cfg(tmp_path, "model.sharding=row_wise", "train.lr=0.1", "train.weight_decay=0", "train.max_epochs=2",
                "ray.num_workers=1")
    r = fit(cfg1, prepared=prepared, resume_from=str(first))
    assert r["world_size"] == 1 and [h["epoch"] for h in r["history"]] == [0, 1]
    assert r["history"][0] == s["history"][0]  # epoch 0 came from the checkpoint, epoch 1 was trained here
    assert r["metrics"]["test/H@10"] > 0.2


def test_sharded_neumf_teacher_evaluates_row_blocks_like_the_dense_model(ray_session, prepared, tmp_path):
    # a row-wise sharded NeuMF ranks both protocols over its item row blocks (split-head keys, recomputed from the
    # current MLP weights at every evaluation); its final metrics equal the dense model's on the same weights
    from rayrec.eval.evaluate import EvalData, evaluate
    from rayrec.models import NeuMF
    from rayrec.sharding.checkpoint import export_dense

    cfg = _cfg(tmp_path, "model.name=neumf", "model.dim=8", "model.sharding=row_wise", "train.lr=0.1",
               "train.weight_decay=0", "train.max_epochs=2", "ray.num_workers=2", "eval.full_each_epoch=true")
    s = fit(cfg, prepared=prepared)
    h = s["history"]
    assert 0 < h[0]["full_valid/Recall@10"] <= 1 and h[1]["full_valid/Recall@10"] != h[0]["full_valid/Recall@10"]
    final = Path(s["checkpoint"])
    best = final / "best_model" if (final / "best_model" / ".metadata").exists() else final
    state = {k.removeprefix("model.").replace("ec.embeddings.", ""): v for k, v in export_dense(best).items()}
    pd_ = load_prepared(prepared)
    dense = NeuMF(pd_.num_users, pd_.num_items, 8)
    dense.load_state_dict(state)
    want = evaluate(dense, EvalData.from_prepared(pd_), "test", cfg.eval)
    assert want["test/H@10"] > 0.12 and want["full/Recall@10"] > 0  # random: 0.10
    for k, v in want.items():
        assert s["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_sharded_lightgcn_teacher_evaluates_ranks_and_teaches(ray_session, prepared, tmp_path):
    # a LightGCN teacher with row-wise sharded tables: propagation over row blocks, full ranking every epoch over
    # the propagated item blocks, then ranked and distilled (the frozen teacher propagates over the same graph)
    lg = ["model.name=lightgcn", "model.dim=8", "model.layers=2", "model.init_std=0.1"]
    cfg = _cfg(tmp_path, *lg, "model.sharding=row_wise", "train.lr=0.1", "train.weight_decay=0",
               "train.max_epochs=2", "ray.num_workers=2", "eval.full_each_epoch=true",
               "train.monitor=full_valid/Recall@10")
    s = fit(cfg, prepared=prepared)
    h = s["history"]
    assert 0 < h[0]["full_valid/Recall@10"] <= 1 and h[1]["full_valid/Recall@10"] != h[0]["full_valid/Recall@10"]
    assert 0 < s["metrics"]["full/Recall@10"] <= 1 and s["metrics"]["test/H@10"] > 0.12  # random: 0.10
    from rayrec.teacher.rank import load_ranking, rank_teacher

    out = rank_teacher(_cfg(tmp_path, *lg, "model.sharding=row_wise", "ray.num_workers=2", "rank.top_n=30",
                            "rank.user_neighbors=3", "rank.item_neighbors=3", "rank.neighbor_pca=0"), s["checkpoint"],
                       prepared=prepared)
    rk = load_ranking(out)
    assert rk.items.shape == (938, 30) and (np.diff(rk.scores, axis=1) <= 1e-6).all()
    teacher = [f"distill.teacher.checkpoint={s['checkpoint']}", f"distill.teacher.ranking={out}",
               "distill.teacher.name=lightgcn", "distill.teacher.dim=8", "distill.teacher.layers=2"]
    with pytest.raises(ConfigError, match="trained with 2 layers"):
        validate(_cfg(tmp_path, *lg, "distill.method=sld", *teacher[:-1], "distill.teacher.layers=3"))
    d = fit(_cfg(tmp_path, *lg, "model.dim=4", "distill.method=mkd", "distill.nkd.K=3", "distill.cpd.Q=5",
                 "distill.cpd.mxK=30", "distill.sld.K=10", "train.max_epochs=1", "ray.num_workers=2",
                 "eval.full=false", *teacher), prepared=prepared)
    assert all(d["history"][0][f"train/kd/{t}"] > 0 for t in ("nkd", "cpd_fd", "sld"))


def test_sharded_needs_workers(tmp_path):
    with pytest.raises(ConfigError, match="num_workers >= 1"):
        validate(_cfg(tmp_path, "model.sharding=row_wise", "ray.num_workers=0"))
    validate(_cfg(tmp_path, "model.sharding=table_wise"))  # BPR's full ranking over table-wise row blocks
    with pytest.raises(ConfigError, match="full ranking of a sharded model"):
        validate(_cfg(tmp_path, "model.sharding=table_wise", "model.name=neumf", "model.dim=24"))
    with pytest.raises(ConfigError, match="CUDA"):
        validate(_cfg(tmp_path, "model.sharding=row_wise", "model.fused_optimizer=adam"))
    with pytest.raises(ConfigError, match="row blocks"):
        validate(_cfg(tmp_path, "model.sharding=column_wise", "model.name=lightgcn"))
    with pytest.raises(ConfigError, match="multiple of 4"):
        validate(_cfg(tmp_path, "model.sharding=row_wise", "model.name=neumf", "model.dim=250", "eval.full=false"))
    with pytest.raises(ConfigError, match="no weight decay"):
        validate(_cfg(tmp_path, "model.sharding=row_wise", "model.fused_optimizer=exact_adagrad", "train.weight_decay=0.1"))
