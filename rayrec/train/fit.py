"""Driver side of training: prepare the data, start/join Ray, run a ``TorchTrainer``, return the summary."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Callable

from rayrec.config import ExperimentConfig, TrainConfig, resolve_storage_root
from rayrec.errors import ConfigError, NonFiniteError


def per_epoch_metric_keys(cfg: ExperimentConfig) -> set[str]:
    keys = {"train/loss", "train/rows_per_s"}
    if cfg.eval.sampled:
        keys |= {f"valid/{m}@{k}" for k in cfg.eval.sampled_ks for m in ("H", "N", "M")}
    if cfg.eval.full_each_epoch:
        keys |= {f"full_valid/{m}@{k}" for k in cfg.eval.full_ks for m in ("Recall", "NDCG", "HR")}
    return keys


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that dataclass validation cannot do alone (raised before Ray starts)."""
    keys = per_epoch_metric_keys(cfg)
    if cfg.train.monitor not in keys:
        raise ConfigError(
            f"train.monitor={cfg.train.monitor!r} is not computed every epoch; choose one of {sorted(keys)} "
            f"(full-ranking keys need eval.full_each_epoch=true)"
        )
    unknown = [k for k in cfg.train.patience_any if k not in keys]
    if unknown:
        raise ConfigError(f"train.patience_any names {unknown}, not computed every epoch; choose from {sorted(keys)}")
    if cfg.eval.sampled and cfg.data.split == "ratio":
        raise ConfigError("eval.sampled needs one held-out item per user (data.split loo or derrd), not split=ratio")
    if cfg.eval.sampled and cfg.data.num_eval_negatives == 0:
        raise ConfigError("eval.sampled needs data.num_eval_negatives > 0")
    _validate_distill(cfg)
    if cfg.train.fault_step >= 0 and cfg.train.fault_rank >= max(cfg.ray.num_workers, 1):
        raise ConfigError(f"train.fault_rank={cfg.train.fault_rank} but ray.num_workers={cfg.ray.num_workers}")
    if cfg.train.fault_step >= 0 and cfg.ray.num_workers == 0:
        raise ConfigError("train.fault_step kills a worker process: needs ray.num_workers >= 1")
    if cfg.ray.use_gpu and cfg.ray.num_workers == 0:
        raise ConfigError("ray.use_gpu needs ray.num_workers >= 1")
    if cfg.model.sharding != "none":
        if cfg.model.name == "lightgcn":  # propagation over row blocks (rayrec.models.sharded_lightgcn)
            if cfg.model.sharding not in ("row_wise", "table_wise"):
                raise ConfigError(f"a sharded LightGCN propagates over row blocks: model.sharding=row_wise or "
                                  f"table_wise, not {cfg.model.sharding}")
        if cfg.ray.num_workers == 0:
            raise ConfigError("model.sharding needs ray.num_workers >= 1 (local mode has no process group)")
        # the item tables' row blocks (a replicated data_parallel table: rank 0's) score every user's items
        # (tests/sharding/test_sharded_eval.py, test_sharded_lightgcn.py)
        full_ok = {"bpr": ("row_wise", "table_wise", "data_parallel"), "neumf": ("row_wise", "data_parallel"),
                   "lightgcn": ("row_wise", "table_wise")}
        if (cfg.eval.full or cfg.eval.full_each_epoch) and cfg.model.sharding not in full_ok[cfg.model.name]:
            raise ConfigError("full ranking of a sharded model is implemented for bpr (row_wise, table_wise, "
                              "data_parallel), neumf (row_wise, data_parallel) and lightgcn (row_wise, table_wise); "
                              "set eval.full=false (and eval.full_each_epoch=false) for this model")
        if cfg.model.dim % 4 and cfg.model.sharding != "data_parallel":
            raise ConfigError(f"model.dim={cfg.model.dim}: fbgemm's fused embedding kernels need a multiple of 4 for "
                              f"sharded tables (e.g. {cfg.model.dim // 4 * 4} or {cfg.model.dim // 4 * 4 + 4})")
        fused_wd = cfg.train.weight_decay if cfg.model.fused_weight_decay is None else cfg.model.fused_weight_decay
        if fused_wd and cfg.model.fused_optimizer in ("exact_sgd", "exact_adagrad"):
            raise ConfigError(f"model.fused_optimizer={cfg.model.fused_optimizer} has no weight decay in fbgemm (it "
                              "would be ignored); set model.fused_weight_decay=0 or use exact_rowwise_adagrad")
        if not cfg.ray.use_gpu and cfg.model.fused_optimizer == "adam":
            raise ConfigError("model.fused_optimizer=adam needs CUDA (ray.use_gpu=true); on CPU use exact_sgd, "
                              "exact_adagrad or exact_rowwise_adagrad")


def _validate_distill(cfg: ExperimentConfig) -> None:
    """The teacher artifacts a distillation method reads exist and fit the run (checked before Ray starts)."""
    from rayrec.distill import needs

    dc = cfg.distill
    if dc.method == "none":
        return
    if cfg.model.sharding != "none":
        raise ConfigError("distillation trains a dense (DDP) student: set model.sharding=none "
                          "(the teacher's sharding is distill.teacher.sharding)")
    need = needs(dc)
    uses_de, uses_lists = need.checkpoint, need.lists or need.neighbors
    if dc.teacher.ranking and not dc.teacher.checkpoint:
        # the ranking artifact records the teacher it ranked: one path is enough to find both
        from rayrec.artifacts import read_manifest
        from rayrec.teacher.rank import KIND, RERUN

        m = read_manifest(dc.teacher.ranking, KIND, RERUN)
        dc.teacher.checkpoint = m.get("teacher_checkpoint")
        if (dc.teacher.name, dc.teacher.dim) != (m["model"]["name"], m["model"]["dim"]):
            raise ConfigError(f"distill.teacher says {dc.teacher.name} d={dc.teacher.dim} but the ranking "
                              f"{dc.teacher.ranking} was made by {m['model']['name']} d={m['model']['dim']}; set "
                              f"distill.teacher.name / dim to match")
    if uses_de:
        if not dc.teacher.checkpoint:
            raise ConfigError(f"distill.method={dc.method} needs distill.teacher.checkpoint (train_teacher's output)")
        from rayrec.teacher.rank import _teacher_model_files

        _teacher_model_files(Path(dc.teacher.checkpoint), dc.teacher.dim, "distill.teacher.dim")
        if cfg.ray.num_workers == 0:
            raise ConfigError(f"distill.method={dc.method} loads the sharded teacher: needs ray.num_workers >= 1")
        summary = Path(dc.teacher.checkpoint) / "summary.json"
        if dc.teacher.name == "lightgcn" and summary.exists():
            trained = json.loads(summary.read_text()).get("config", {}).get("model", {}).get("layers")
            if trained is not None and trained != dc.teacher.layers:
                raise ConfigError(f"distill.teacher.layers={dc.teacher.layers} but the LightGCN teacher in "
                                  f"{dc.teacher.checkpoint} was trained with {trained} layers")
        if dc.teacher.name != cfg.model.name:
            raise ConfigError(f"{dc.method} needs the same base model for teacher and student: distill.teacher.name="
                              f"{dc.teacher.name}, model.name={cfg.model.name}")
    if uses_lists:
        if not dc.teacher.ranking:
            raise ConfigError(f"distill.method={dc.method} needs distill.teacher.ranking (rank_teacher's output)")
        from rayrec.artifacts import read_manifest
        from rayrec.teacher.rank import KIND, RERUN

        read_manifest(dc.teacher.ranking, KIND, RERUN)


def _ranking_for(cfg: ExperimentConfig) -> dict | None:
    """``{"path", "num_users", "num_items", "top_n"}`` of the ranking artifact the method reads, else None."""
    from rayrec.distill import needs

    dc = cfg.distill
    need = needs(dc)
    lists, neighbors = need.lists, need.neighbors
    if not (lists or neighbors):
        return None
    from rayrec.artifacts import read_manifest
    from rayrec.teacher.rank import KIND, RERUN

    m = read_manifest(dc.teacher.ranking, KIND, RERUN)
    if neighbors and not {"user_neighbors", "item_neighbors"} <= set(m["counts"]):
        raise ConfigError(f"{dc.teacher.ranking}: no user/item neighbour lists; rerun {RERUN} with "
                          "rank.user_neighbors and rank.item_neighbors > 0")
    return {"path": str(Path(dc.teacher.ranking).resolve()), "num_users": m["num_users"],
            "num_items": m["num_items"], "top_n": m["top_n"], "lists": lists, "neighbors": neighbors,
            "k_user": m["rank"]["user_neighbors"], "k_item": m["rank"]["item_neighbors"]}


def prepared_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.data.prepared_root).resolve() if cfg.data.prepared_root else resolve_storage_root(cfg) / "prepared"


def latest_checkpoint(cfg: ExperimentConfig, since: str | None = None) -> Path:
    """The newest per-epoch checkpoint (one with training state) of any run named ``cfg.name`` under the storage
    root: what ``--resume`` continues from. Ray Train names checkpoints by time, so the newest sorts last.
    ``since`` (``YYYYmmdd-HHMMSS``, as in run names): only runs started at or after it."""
    from rayrec.errors import ArtifactError

    root = resolve_storage_root(cfg) / "ray_train"
    from rayrec.artifacts import check_checkpoint

    def complete(d: Path) -> bool:  # a checkpoint cut short by the failure that ended the run is skipped
        try:
            check_checkpoint(d, "")
            return True
        except ArtifactError:
            return False

    def started(run: Path) -> bool:  # run directories are named <name>-YYYYmmdd-HHMMSS (fit)
        return since is None or run.name[len(cfg.name) + 1:] >= since

    found = sorted((p.parent for p in root.glob(f"{cfg.name}-*/checkpoint_*/state.json")
                    if started(p.parent.parent) and complete(p.parent)), key=lambda p: p.name)
    if not found:
        raise ArtifactError(f"--resume: no checkpoint of a run named {cfg.name!r} under {root}; run without --resume "
                            f"to start (or set name= / storage_root= to the interrupted run's)")
    return found[-1]


def config_fingerprint(cfg: ExperimentConfig | dict) -> str:
    """What a run trains: its whole config but where it runs and what it is called (``ray.*``, ``storage_root``,
    ``name``), the fault-injection/retry keys and ``train.prefetch_epoch``, which do not change what is trained.

    Only the values that differ from the current defaults count, so an option added later with a default that keeps
    the old behaviour leaves the runs made before it resumable (their recorded configs lack the key); a value that
    was the default when a run was made and is not any more still counts (it is recorded)."""
    d = json.loads(json.dumps(cfg if isinstance(cfg, dict) else cfg.to_dict(), default=str))
    for k in ("ray", "storage_root", "name"):
        d.pop(k, None)
    for k in ("fault_step", "fault_rank", "fault_kind", "max_failures", "prefetch_epoch"):
        d.get("train", {}).pop(k, None)
    return hashlib.sha256(json.dumps(_beside_defaults(d, _default_config()), sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _default_config() -> dict:
    return json.loads(json.dumps(ExperimentConfig().to_dict(), default=str))


def _beside_defaults(d: dict, ref: dict) -> dict:
    """``d`` without the keys whose value equals ``ref``'s (recursively; sections left empty dropped)."""
    out = {}
    for k, v in d.items():
        if k in ref and isinstance(v, dict) and isinstance(ref[k], dict):
            v = _beside_defaults(v, ref[k])
            if v:
                out[k] = v
        elif k not in ref or v != ref[k]:
            out[k] = v
    return out


RUN_RECORD = "run.json"  # in every run directory, written before training: the config that run trains
_RUN_DIR = re.compile(r"-\d{8}-\d{6}$")  # <name>-YYYYmmdd-HHMMSS (fit)


def write_run_record(cfg: ExperimentConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_RECORD).write_text(json.dumps({"fingerprint": config_fingerprint(cfg), "config": cfg.to_dict()},
                                                 indent=1, default=str))


def find_resumable(cfg: ExperimentConfig) -> tuple[str, dict | Path] | None:
    """Earlier work on exactly this run (same name, same :func:`config_fingerprint`) under the storage root:
    ``("finished", summary)`` for the newest run that finished (its checkpoint still complete), else
    ``("continue", checkpoint)`` for the newest complete per-epoch checkpoint of an interrupted run, else ``None``.
    A run's config comes from its ``summary.json`` (finished) or its ``run.json`` (written when it started)."""
    from rayrec.artifacts import check_checkpoint
    from rayrec.errors import ArtifactError

    fp = config_fingerprint(cfg)
    root = resolve_storage_root(cfg) / "ray_train"
    runs = sorted((d for d in root.glob(f"{cfg.name}-*") if _RUN_DIR.fullmatch(d.name[len(cfg.name):])),
                  key=lambda d: d.name[len(cfg.name):], reverse=True)
    unfinished: list[Path] = []
    for run in runs:
        try:
            summary = json.loads((run / "summary.json").read_text())
            if config_fingerprint(summary["config"]) == fp:
                if summary.get("checkpoint"):
                    check_checkpoint(summary["checkpoint"], "")
                return "finished", summary
            continue
        except (OSError, ValueError, KeyError, TypeError, ArtifactError):
            pass
        try:
            if config_fingerprint(json.loads((run / RUN_RECORD).read_text())["config"]) == fp:
                unfinished.append(run)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for run in unfinished:
        for ckpt in sorted((p.parent for p in run.glob("checkpoint_*/state.json")), key=lambda p: p.name, reverse=True):
            try:
                check_checkpoint(ckpt, "")
                return "continue", ckpt
            except ArtifactError:  # cut short by the failure that ended the run
                continue
    return None


def fit_or_resume(cfg: ExperimentConfig, *, progress: Callable[[str], None] = print, **kw) -> dict:
    """:func:`fit`, unless earlier work on exactly this run exists (:func:`find_resumable`): a finished run's
    summary is returned as it is, an interrupted one continues from its newest checkpoint (the epochs it trained
    are not trained again, and the rows replay in the same order)."""
    found = find_resumable(cfg)
    if found is not None and found[0] == "finished":
        progress(f"[fit] {cfg.name}: finished before with this config, kept ({found[1]['run_dir']})")
        return found[1]
    if found is not None:
        progress(f"[fit] {cfg.name}: continuing the interrupted run from {found[1]}")
        return fit(cfg, resume_from=str(found[1]), progress=progress, **kw)
    return fit(cfg, progress=progress, **kw)


def _parquet_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.parquet")) / 2**20


def _driver_blocks(path: Path, columns: list[str] | None, blocks: int, shuffle_seed: int | None):
    """The parquet parts under ``path`` read by the driver and put into the object store as ``blocks`` blocks
    (rows permuted with ``shuffle_seed`` first when given)."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray.data

    table = pq.read_table(str(path), columns=columns)
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    bounds = np.linspace(0, table.num_rows, max(1, min(blocks, table.num_rows)) + 1).astype(int)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])


def _small_dataset(path: Path, limit_mb: float):
    """A read-only side input (teacher lists, neighbours): driver-read when small, else a streaming parquet read."""
    import ray.data

    if _parquet_mb(path) <= limit_mb:
        return _driver_blocks(path, None, 16, None)
    return ray.data.read_parquet(str(path))


def train_dataset(tc: TrainConfig, prepared: Path | str):
    """The Ray Dataset of the prepared train interactions (``user``, ``item``) as every run streams it: read once
    and materialised in ``read_blocks`` blocks, each epoch a new seeded block order (``shuffle=blocks``) or a global
    shuffle; each worker gets an equal shard of it (``DataConfig``)."""
    import ray.data

    train_dir = Path(prepared) / "train"
    if tc.materialize and _parquet_mb(train_dir) <= tc.driver_read_mb:
        # small splits: the driver reads the rows and puts `read_blocks` blocks into the object store itself (no
        # Ray Data read tasks, whose worker start-up cost ~5 s per run on 2 cores)
        train_ds = _driver_blocks(train_dir, ["user", "item"], tc.read_blocks,
                                  tc.seed if tc.shuffle == "blocks" else None)
    else:
        train_ds = ray.data.read_parquet(str(train_dir)).select_columns(["user", "item"])
        if tc.shuffle == "blocks":  # one full shuffle up front, so blocks are random subsets of the rows
            train_ds = train_ds.random_shuffle(seed=tc.seed)
        if tc.materialize:  # read once; every epoch then streams from the object store (~0.2 s vs ~3 s per epoch)
            train_ds = train_ds.repartition(tc.read_blocks).materialize()
    seed = ray.data.RandomSeedConfig(seed=tc.seed, reseed_after_execution=True)  # new order every epoch, reproducible
    if tc.shuffle == "global":
        train_ds = train_ds.random_shuffle(seed=seed)
    elif tc.shuffle == "blocks":
        train_ds = train_ds.randomize_block_order(seed=seed)
    return train_ds


def train_data_config(tc: TrainConfig, side_inputs: bool = False):
    """Ray Train's ``DataConfig`` for :func:`train_dataset`: only ``train`` is split over the workers (side inputs
    such as the teacher's lists reach every worker whole); ``deterministic``: the same blocks reach the same rank
    in the same order on every run (and after a restart). ``None``: Ray's default."""
    import ray.train

    if tc.deterministic:
        opts = ray.train.DataConfig.default_ingest_options()
        opts.preserve_order = True
        return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": opts},
                                    enable_shard_locality=False)
    return ray.train.DataConfig(datasets_to_split=["train"]) if side_inputs else None


def fit(
    cfg: ExperimentConfig,
    *,
    prepared: Path | None = None,
    resume_from: str | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = print,
    callbacks: list | None = None,
) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` through Ray Train; return rank 0's summary (also in ``summary.json``).
    ``resume``: continue from the newest checkpoint of this run name under the storage root (``latest_checkpoint``);
    ``resume_from``: from that checkpoint. ``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``
    when a Tune trial runs this fit)."""
    validate(cfg)
    if resume and resume_from is None:
        resume_from = str(latest_checkpoint(cfg))
        progress(f"[fit] resuming {cfg.name} from {resume_from}")
    if resume_from is not None:
        from rayrec.artifacts import check_checkpoint

        check_checkpoint(resume_from, "the training job without resuming")
    from rayrec.data.prepared import prepare
    from rayrec.runtime import init_ray

    init_ray(cfg.ray)  # a wrong cluster address fails here, before any data is prepared
    if prepared is None:
        prepared = prepare(cfg.data, prepared_root(cfg), progress=progress)
    if cfg.model.table_budget_mb:
        from rayrec.sharding.memory import check_table_budget

        counts = json.loads((Path(prepared) / "manifest.json").read_text())["counts"]
        need = check_table_budget(cfg.model.name, int(counts["users"]), int(counts["items"]), cfg.model.dim,
                                  cfg.model.sharding if cfg.model.sharding != "none" else "data_parallel",
                                  cfg.model.fused_optimizer if cfg.model.sharding != "none" else "adam",
                                  max(cfg.ray.num_workers, 1), cfg.model.table_budget_mb)
        progress(f"[fit] tables: {need / 2**20:,.1f} MiB per worker (budget {cfg.model.table_budget_mb:g} MiB)")

    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayrec.runtime import init_ray, worker_runtime_env
    from rayrec.train.loop import train_loop_per_worker

    init_ray(cfg.ray)
    storage = resolve_storage_root(cfg) / "ray_train"
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tc = cfg.train
    train_ds = train_dataset(tc, prepared)
    datasets = {"train": train_ds}
    ranking = _ranking_for(cfg)
    if ranking is not None:
        # [ray] the teacher's top-N lists stream to every worker through Ray Data (not split: each worker needs
        # every user's list, since its interaction shard covers any user)
        if ranking["lists"]:
            datasets["teacher_topn"] = _small_dataset(Path(ranking["path"]) / "topn", tc.driver_read_mb)
        if ranking["neighbors"]:
            for kind in ("user", "item"):
                datasets[f"teacher_{kind}_nn"] = _small_dataset(Path(ranking["path"]) / f"{kind}_neighbors",
                                                                tc.driver_read_mb)
    data_config = train_data_config(tc, side_inputs=ranking is not None)
    rc = cfg.ray
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "prepared": str(prepared), "resume_from": resume_from,
                           "ranking": ranking, "fault_marker": str(storage / run_name / ".fault_injected")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=rc.num_workers,
            use_gpu=rc.use_gpu,
            resources_per_worker={"CPU": rc.cpus_per_worker} if rc.num_workers > 0 else None,
        ),
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo", timeout_s=rc.timeout_s),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            # [ray] a dead worker restarts the whole group from the last checkpoint, up to max_failures times
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own per-epoch lines are the progress
            # print() in workers goes straight to the driver (Ray's print patch would log every line twice)
            worker_runtime_env=worker_runtime_env(),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        **({"dataset_config": data_config} if data_config is not None else {}),
    )
    write_run_record(cfg, storage / run_name)  # what find_resumable matches an interrupted run by
    progress(f"[fit] {run_name}: {rc.num_workers} worker(s), data {prepared}")
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = dict(result.return_value or {})
    if summary.get("error"):  # the loop stopped itself (non-finite loss): the last good checkpoint stays
        last = result.checkpoint.path if result.checkpoint is not None else None
        raise NonFiniteError(f"{run_name}: {summary['error']}; last good checkpoint: {last or 'none (first epoch)'}")
    # local mode (num_workers=0) persists no checkpoints and has no run path: keep the summary beside the others
    run_dir = Path(result.path) if result.path else storage / run_name
    summary["run_dir"] = str(run_dir)
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    summary["prepared"] = str(prepared)
    summary["config"] = cfg.to_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
