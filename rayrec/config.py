"""Typed experiment configuration built from layered YAML plus dotted CLI overrides.

Layering (later wins)::

    configs/base.yaml  <  files named in `defaults:` (left to right)  <  the file's own body  <  CLI `a.b=c`

A YAML file may start with ``defaults: [base, data/citeulike_t, model/bpr_d20]``; names are resolved relative to
the ``configs/`` directory that holds the file (``.yaml`` optional). Every key must exist in the dataclasses below
and every value must have the declared type: anything else raises :class:`~rayrec.errors.ConfigError` naming the
dotted key, before any Ray process starts. Defaults live only here and in YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from rayrec.distill.cd import CDConfig
from rayrec.distill.cpd import CPDConfig
from rayrec.distill.de import DEConfig
from rayrec.distill.htd import HTDConfig
from rayrec.distill.mkd import MKDConfig
from rayrec.distill.nkd import NKDConfig
from rayrec.distill.rd import RDConfig
from rayrec.distill.rrd import RRDConfig
from rayrec.distill.sld import SLDConfig
from rayrec.distill.unkd import UnKDConfig
from rayrec.errors import ConfigError


# --------------------------------------------------------------------------------------------- config nodes
@dataclass
class DataConfig:
    """Where the data comes from and how it is prepared and split."""

    dataset: str = "citeulike-t"  # registry key (rayrec.data.registry.DATASETS) or "files" with `files` set
    root: str | None = None  # data root; None -> $RAYREC_DATA -> ./data
    files: list[str] = field(default_factory=list)  # explicit raw files (dataset "files"), relative to root
    reader: str | None = None  # reader for `files` (users_dat | movielens_tab | movielens_dcolon | csv | parquet)
    download: bool = True  # download from the registry URL when files are missing and a network exists
    rating_threshold: float | None = None  # binarise: keep rating >= threshold (None keeps every row)
    min_user_interactions: int = 0  # k-core filter on users (0/1 = off)
    min_item_interactions: int = 0  # k-core filter on items (0/1 = off)
    split: Literal["loo", "ratio", "derrd"] = "loo"  # leave-one-out | per-user ratio holdout | DE-RRD's published split
    order: Literal["random", "time", "file"] = "random"  # which items are held out: random, latest, or last in file
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/valid/test for split=ratio
    num_eval_negatives: int = 499  # sampled protocol: fixed negatives per user (0 = none)
    seed: int = 0  # split and negative sampling seed
    prepared_root: str | None = None  # where prepared datasets go; None -> <storage_root>/prepared

    def __post_init__(self) -> None:
        if self.min_user_interactions < 0 or self.min_item_interactions < 0:
            raise ConfigError("data.min_*_interactions must be >= 0")
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"data.ratios must be three non-negative numbers summing to 1, got {self.ratios}")
        if self.num_eval_negatives < 0:
            raise ConfigError("data.num_eval_negatives must be >= 0")


@dataclass
class ModelConfig:
    """A base recommender (registry key + size)."""

    name: Literal["bpr", "neumf", "lightgcn"] = "bpr"
    dim: int = 20  # embedding size d (NeuMF: d for GMF and for MLP tables)
    layers: int = 3  # LightGCN propagation steps (representations = mean of layers 0..layers)
    init_std: float = 0.01  # N(0, init_std) embedding init (DE-RRD code)
    # none: plain nn.Embedding tables, DDP (students). Otherwise TorchRec tables sharded across the workers by
    # DistributedModelParallel with this sharding type (teachers; see rayrec.sharding)
    sharding: Literal["none", "row_wise", "table_wise", "column_wise", "data_parallel"] = "none"
    # optimizer fused into the sharded tables' backward (lr/weight decay from train.*); CPU: exact_* only
    fused_optimizer: Literal["exact_sgd", "exact_adagrad", "exact_rowwise_adagrad", "adam"] = "exact_rowwise_adagrad"
    # learning rate / L2 of the fused table optimizer; None: train.lr / train.weight_decay (dense layers such as
    # NeuMF's MLP always use train.lr with Adam)
    fused_lr: float | None = None
    fused_weight_decay: float | None = None
    # per-worker budget for the embedding tables + their fused optimizer state, in MiB (0: no limit). A sharded
    # model whose estimated share exceeds it is refused before any worker starts (see rayrec.sharding.memory)
    table_budget_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ConfigError(f"model.dim must be > 0, got {self.dim}")
        if self.layers < 0:
            raise ConfigError(f"model.layers must be >= 0, got {self.layers}")
        if self.table_budget_mb < 0:
            raise ConfigError(f"model.table_budget_mb must be >= 0 (0: no limit), got {self.table_budget_mb}")


@dataclass
class TrainConfig:
    """The optimisation loop shared by teachers, students and distillation."""

    max_epochs: int = 1000
    batch_size: int = 1024  # global batch (split evenly across workers)
    lr: float = 1e-3
    weight_decay: float = 1e-3  # Adam L2 on every parameter (DE-RRD code)
    loss_reduction: Literal["sum", "mean"] = "sum"  # DE-RRD sums losses; "sum" keeps the paper's weight scales
    num_negatives: int = 1  # training negatives per positive, resampled every epoch
    patience: int = 20  # early stopping: epochs without improvement of `monitor`
    monitor: str = "valid/H@5"  # metric key used for early stopping and model selection
    monitor_mode: Literal["max", "min"] = "max"
    # early stopping also waits while any of these metrics improves on its own best (the DE-RRD code: valid H@5,
    # H@10 or H@20); model selection stays on `monitor`. Empty: `monitor` alone
    patience_any: list[str] = field(default_factory=list)
    seed: int = 0
    # blocks: rows shuffled once when materialised, then each epoch a new block order + a seeded worker-side
    #   shuffle buffer (~0.3 s/epoch on CiteULike); global: a full Ray Data random_shuffle every epoch (~3 s/epoch
    #   on 2 cores); none: file order
    shuffle: Literal["blocks", "global", "none"] = "blocks"
    shuffle_buffer: int = 16_384  # rows of the worker-side shuffle buffer (shuffle=blocks)
    materialize: bool = True  # keep the train rows in Ray's object store across epochs (False: re-read parquet)
    read_blocks: int = 64  # blocks the materialised train rows are cut into (unit of block-order shuffling)
    # start the next epoch's stream (Ray Data's per-epoch start-up and its first chunk) in a background thread when
    # an epoch's training ends, so it overlaps the evaluation and reporting instead of delaying the next epoch
    # (CiteULike, 1 worker: ~0.15 of a ~0.45 s student epoch went to that start-up). Same rows, same order
    prefetch_epoch: bool = True
    # splits up to this size (MiB of parquet) are read by the driver and put into the object store directly; larger
    # ones are read by Ray Data tasks across the cluster
    driver_read_mb: float = 256.0
    checkpoint_every: int = 1  # epochs between checkpoints (each carries the metrics)
    num_to_keep: int = 2  # checkpoints kept by Ray Train
    threads_per_worker: int = 0  # torch threads in each worker; 0 = cores // workers (at least 1)
    # flush subnormal floats to zero on every compute thread (CPU): weights decaying below 1.2e-38 made DE's expert
    # GEMMs 4x slower (rayrec.train.denormal); changes only values below that
    flush_denormal: bool = True
    # worker-group failures (a dead worker process, a lost node) recovered from the last checkpoint by Ray Train
    # (FailureConfig); a retry restarts every worker and reloads the checkpoint. 0 = fail at the first error
    max_failures: int = 2
    # same seed, world size and data -> the same rows on the same rank in the same order (Ray Data preserve_order,
    # no locality-based shard assignment), so metrics repeat exactly on CPU
    deterministic: bool = True
    check_finite: bool = True  # stop at the first non-finite loss or gradient (step and loss terms named)
    # how DDP syncs a dense model's embedding-table gradients between workers: dense = DDP's all-reduce of the
    # whole tables; rows = only the rows a step touched (rayrec.train.grad_sync; a table most of whose rows are
    # touched falls back to dense), for tables large against a step's rows on a slow network. Same mean gradient
    # either way (bit-equal with 2 workers). On 2 workers of one 2-core machine rows was no faster (CiteULike:
    # student alone 1.18 vs 1.22 s an epoch, a d=200 model 6.61 vs 6.63 s, RRD 2.31 vs 2.28, one-hot DE 6.15 vs 5.55)
    grad_sync: Literal["rows", "dense"] = "dense"
    # fault injection for tests and drills, once per run at global step `fault_step` on worker `fault_rank` (-1 =
    # never): exit = the process dies (os._exit); nan = that rank's loss becomes NaN (a numerical blow-up); inf = its
    # loss becomes +inf while its gradients stay finite (a term that overflowed without a gradient)
    fault_step: int = -1
    fault_rank: int = 1
    fault_kind: Literal["exit", "nan", "inf"] = "exit"

    def __post_init__(self) -> None:
        for k in ("max_epochs", "batch_size", "num_negatives", "patience", "checkpoint_every", "num_to_keep"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"train.{k} must be > 0, got {getattr(self, k)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.driver_read_mb < 0:
            raise ConfigError("train.lr must be > 0, train.weight_decay and train.driver_read_mb >= 0")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if self.fault_step < -1 or self.fault_rank < 0:
            raise ConfigError("train.fault_step must be >= -1 and train.fault_rank >= 0")


@dataclass
class EvalConfig:
    """Which protocols and cut-offs are computed."""

    sampled: bool = True  # held-out item + its fixed negatives (needs data.num_eval_negatives > 0)
    full: bool = True  # full ranking over all items
    sampled_ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    full_ks: list[int] = field(default_factory=lambda: [20])
    full_each_epoch: bool = False  # also compute full-ranking valid metrics every epoch (slower)
    mask_valid_when_testing: bool = True  # mask valid items when ranking for test (MKD's protocol: false)
    users_without_truth: Literal["skip", "zero"] = "skip"  # users with no held-out item: left out, or counted as 0
    memory_budget_mb: int = 256  # bound on the [users x items] score block of one evaluation chunk (full ranking
    # on a CPU: at most rayrec.eval.evaluate.CPU_FULL_BLOCK_MB)

    def __post_init__(self) -> None:
        for k in (*self.sampled_ks, *self.full_ks):
            if k <= 0:
                raise ConfigError(f"eval cut-offs must be > 0, got {k}")
        if self.memory_budget_mb <= 0:
            raise ConfigError("eval.memory_budget_mb must be > 0")


@dataclass
class RankConfig:
    """The teacher's distributed ranking artifact: top-N items per user, and k nearest users / items."""

    top_n: int = 500  # items per user, best first (DE-RRD and MKD sample from the teacher's top-N)
    exclude: Literal["train", "none"] = "train"  # items never returned for a user
    user_chunk: int = 1024  # users per rank per collective step (memory: W * user_chunk * I/W scores per rank)
    user_neighbors: int = 0  # k nearest users by the teacher's user representations (0: none)
    item_neighbors: int = 0  # k nearest items (0: none); MKD's NKD uses these
    neighbor_metric: Literal["euclidean", "cosine", "dot"] = "euclidean"  # MKD: Euclidean after PCA
    neighbor_pca: int = 150  # PCA components (centred) before the neighbour search; 0: raw representations

    def __post_init__(self) -> None:
        if self.top_n <= 0:
            raise ConfigError(f"rank.top_n must be > 0, got {self.top_n}")
        if self.user_chunk <= 0:
            raise ConfigError(f"rank.user_chunk must be > 0, got {self.user_chunk}")
        for k in ("user_neighbors", "item_neighbors", "neighbor_pca"):
            if getattr(self, k) < 0:
                raise ConfigError(f"rank.{k} must be >= 0, got {getattr(self, k)}")


@dataclass
class TeacherRef:
    """The trained teacher a distillation run reads (artifacts of train_teacher and rank_teacher)."""

    checkpoint: str | None = None  # sharded teacher checkpoint (DE: representations looked up every step)
    ranking: str | None = None  # rank_teacher's output directory (RD, CD, RRD: the teacher's top-N lists)
    name: Literal["bpr", "neumf", "lightgcn"] = "bpr"
    dim: int = 200
    # how the frozen teacher is held in the workers: sharded like in training, or "dense" (whole in every worker,
    # no TorchRec: small teachers only; see rayrec.teacher.frozen.load_frozen_teacher)
    sharding: Literal["row_wise", "table_wise", "column_wise", "data_parallel", "dense"] = "row_wise"
    layers: int = 3  # a LightGCN teacher's propagation steps (as trained; checked against its summary.json)


@dataclass
class DistillConfig:
    """Which method distills the teacher into ``model`` (the student), and each method's hyperparameters
    (paper symbols; see rayrec/distill/<method>.py). ``none`` trains the student alone through the same loop."""

    method: Literal["none", "rd", "cd", "de", "rrd", "de_rrd", "nkd", "cpd", "sld", "mkd", "htd", "unkd"] = "none"
    teacher: TeacherRef = field(default_factory=TeacherRef)
    de: DEConfig = field(default_factory=DEConfig)
    rrd: RRDConfig = field(default_factory=RRDConfig)
    rd: RDConfig = field(default_factory=RDConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    nkd: NKDConfig = field(default_factory=NKDConfig)
    cpd: CPDConfig = field(default_factory=CPDConfig)
    sld: SLDConfig = field(default_factory=SLDConfig)
    mkd: MKDConfig = field(default_factory=MKDConfig)
    htd: HTDConfig = field(default_factory=HTDConfig)
    unkd: UnKDConfig = field(default_factory=UnKDConfig)


@dataclass
class RayConfig:
    """How Ray is reached and how many workers train."""

    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local Ray started here
    num_cpus: int | None = None  # logical CPUs of a local Ray; None = max(4, 2 * cores) (see rayrec.runtime)
    num_workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    object_store_mb: int = 1024
    timeout_s: int = 600  # collective timeout (a rank mismatch fails instead of hanging)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("ray.num_workers must be >= 0 (0 = local mode, in-process)")
        if self.cpus_per_worker <= 0:
            raise ConfigError("ray.cpus_per_worker must be > 0")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    storage_root: str = "runs"  # every artifact of the run goes under here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- strict builder
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after YAML parsing) and return it, converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")  # pragma: no cover - programming error


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in values.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (valid keys here: {close})")
        kwargs[k] = _coerce(v, hints[k], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


# --------------------------------------------------------------------------------------------- YAML layering
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _find_config_dir(path: Path) -> Path:
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return CONFIG_DIR


def load_yaml_layers(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file with its `defaults:` layers merged underneath it."""
    p = Path(path)
    if not p.exists() and p.suffix != ".yaml":
        p = p.with_suffix(".yaml")
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    p = p.resolve()
    if p in _seen:
        raise ConfigError(f"config defaults cycle: {' -> '.join(str(s) for s in (*_seen, p))}")
    try:
        body = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    defaults = body.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    merged: dict = {}
    cdir = _find_config_dir(p)
    for name in defaults:
        merged = deep_merge(merged, load_yaml_layers(cdir / name, (*_seen, p)))
    return deep_merge(merged, body)


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` (value parsed as YAML: 3, 1e-3, true, [5,10], null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Layer ``configs/base.yaml``, the given files and the overrides into a validated :class:`ExperimentConfig`."""
    if paths is None:
        paths = []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict = {}
    base = CONFIG_DIR / "base.yaml"
    if base.exists():
        merged = load_yaml_layers(base)
    for p in paths:
        merged = deep_merge(merged, load_yaml_layers(p))
    for o in overrides or []:
        merged = deep_merge(merged, parse_override(o))
    return build(ExperimentConfig, merged)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def parse_cli(argv: list[str] | None = None, description: str | None = None,
              add_args: Callable[[argparse.ArgumentParser], None] | None = None,
              ) -> tuple[ExperimentConfig, argparse.Namespace]:
    """``--config a.yaml [--config b.yaml] [key.path=value ...]`` -> validated config (before Ray starts).
    ``add_args`` adds a job's own options (e.g. ``--checkpoint``)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="YAML file (repeatable; later files win)")
    if add_args is not None:
        add_args(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01 ray.num_workers=1")
    ns = ap.parse_args(argv)
    return load_config(ns.config, ns.overrides), ns


def resolve_storage_root(cfg: ExperimentConfig) -> Path:
    return Path(os.path.expanduser(cfg.storage_root)).resolve()
