"""Prepared datasets: the one on-disk form every training and evaluation job reads.

:func:`prepare` runs ``locate -> read -> binarise -> dedup -> k-core -> remap -> split -> negatives`` for a
:class:`~rayrec.config.DataConfig` and writes the result atomically (into a temp directory beside the target,
then ``os.rename``; on any error the temp directory is removed, so a partial output never exists)::

    <prepared_root>/<dataset>__<split>__<hash>/     hash = sha256(format, params, source checksums)[:12]
        manifest.json                               written last; see below
        train/part-00000.parquet ...                user:int64, item:int64 [, timestamp:int64]
        valid/part-00000.parquet
        test/part-00000.parquet
        negatives.parquet                           user:int64, items:fixed_size_list<int64>[n] (n > 0 only)
        user_map.parquet, item_map.parquet          id:int64 -> raw_id:int64 (identity for DE-RRD's split)

Splits are directories so ``ray.data.read_parquet(<dir>/train)`` works and large data can be sharded
(``ROWS_PER_PART`` rows per part). ``manifest.json`` holds ``format_version``, ``dataset``,
``source.files[{path, sha256}]``, ``params`` (the DataConfig fields that change the output, and the seed),
``counts`` (users, items, interactions, train, valid, test, users_without_valid, users_without_test),
``num_eval_negatives``, ``created`` (UTC) and the rayrec ``version``. A target whose manifest matches is left as
it is ("up to date"). :func:`load_prepared` reads it back as :class:`PreparedData`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import rayrec
from rayrec.config import DataConfig
from rayrec.data.preprocess import binarise, dedup, kcore, remap
from rayrec.data.readers import READERS, Interactions
from rayrec.data.registry import DATASETS, file_checksum, locate, resolve_data_root
from rayrec.data.splits import (
    Split,
    leave_one_out,
    load_derrd_split,
    ratio_split,
    sample_eval_negatives,
    user_items_csr,
)
from rayrec.errors import ArtifactError, ConfigError, DatasetNotFoundError

__all__ = ["FORMAT_VERSION", "ROWS_PER_PART", "PreparedData", "prepare", "load_prepared"]

FORMAT_VERSION = 1
ROWS_PER_PART = 5_000_000  # rows per split part file
NEG_ROWS_PER_GROUP = 16_384  # users per row group of negatives.parquet
SPLITS = ("train", "valid", "test")
_DERRD_FILES = ("train.tsv", "valid.tsv", "test.tsv", "counts.txt")


# --------------------------------------------------------------------------------------------- source
@dataclass
class _Source:
    """What to read: the reader target(s) and the files whose checksums identify the input."""

    name: str  # dataset name used in the directory name
    reader: str | None  # READERS key, None for DE-RRD's presplit directory
    paths: list[Path]  # passed to the reader (or load_derrd_split), in order
    files: list[Path]  # every file whose content defines the input (hashed)
    root: Path


def _expand(p: Path, reader: str | None) -> list[Path]:
    """The files behind a reader target: itself, a directory's top-level *.parquet, or DE-RRD's four files."""
    if not p.is_dir():
        return [p]
    if reader is None:  # missing ones are reported by load_derrd_split
        return [p / f for f in _DERRD_FILES if (p / f).is_file()]
    return sorted(f for f in p.glob("*.parquet") if f.is_file())


def _resolve_source(cfg: DataConfig) -> _Source:
    root = resolve_data_root(cfg.root)
    if cfg.dataset == "files":
        if not cfg.files:
            raise ConfigError("data.dataset='files' needs data.files (paths relative to the data root)")
        paths = [(root / f) if not Path(f).is_absolute() else Path(f) for f in cfg.files]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DatasetNotFoundError(
                f"data.files not found: {', '.join(missing)} "
                f"(data root {root}: data.root, else $RAYREC_DATA, else ./data)"
            )
        if cfg.split == "derrd":
            if len(paths) != 1 or not paths[0].is_dir():
                raise ConfigError("data.split='derrd' with data.dataset='files' needs files=[<directory with "
                                  "train.tsv, valid.tsv, test.tsv, counts.txt>]")
            reader = None
        else:
            if cfg.reader is None or cfg.reader not in READERS:
                raise ConfigError(
                    f"data.reader must be one of {sorted(READERS)} for dataset 'files', got {cfg.reader!r}"
                )
            reader = cfg.reader
        files = [f for p in paths for f in _expand(p, reader)]
        return _Source("files", reader, paths, files, root)
    if cfg.dataset not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ConfigError(f"data.dataset: unknown dataset '{cfg.dataset}' (known: {known}, or 'files')")
    spec = DATASETS[cfg.dataset]
    if spec.presplit != (cfg.split == "derrd"):
        raise ConfigError(
            f"data.split='{cfg.split}' does not fit dataset '{spec.name}': "
            + ("it is a published split, use data.split=derrd" if spec.presplit
               else "split 'derrd' needs dataset 'citeulike-t-derrd' (DE-RRD's published split)")
        )
    directory = locate(spec.name, root, download=cfg.download)
    target = directory / spec.reader_target
    if spec.presplit:
        files = [directory / f for f in spec.files]
    else:
        files = sorted({*(directory / f for f in spec.files), *_expand(target, spec.reader)})
    return _Source(spec.name, spec.reader, [target], files, root)


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p.resolve())


def _params(cfg: DataConfig, src: _Source) -> dict[str, Any]:
    """The DataConfig fields that change the prepared output (root, download, prepared_root do not)."""
    params: dict[str, Any] = {"dataset": cfg.dataset, "reader": src.reader}
    if cfg.dataset == "files":
        params["files"] = list(cfg.files)
    params["split"] = cfg.split
    if cfg.split != "derrd":
        params |= {
            "rating_threshold": cfg.rating_threshold,
            "min_user_interactions": cfg.min_user_interactions,
            "min_item_interactions": cfg.min_item_interactions,
            "order": cfg.order,
        }
    if cfg.split == "ratio":
        params["ratios"] = [float(r) for r in cfg.ratios]
    params |= {"num_eval_negatives": cfg.num_eval_negatives, "seed": cfg.seed}
    return params


# --------------------------------------------------------------------------------------------- build
def _read(src: _Source) -> Interactions:
    assert src.reader is not None
    parts = [READERS[src.reader](p) for p in src.paths]
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        cols = [getattr(p, name) for p in parts]
        return None if any(c is None for c in cols) else np.concatenate(cols)

    return Interactions(user=cat("user"), item=cat("item"), rating=cat("rating"), timestamp=cat("timestamp"))


def _stats(inter: Interactions) -> str:
    return f"{len(inter):,} rows, {len(np.unique(inter.user)):,} users, {len(np.unique(inter.item)):,} items"


def _build(cfg: DataConfig, src: _Source, progress: Callable[[str], None]) -> tuple[Split, np.ndarray, np.ndarray]:
    """The split on contiguous ids and the raw-id maps ``user_raw [U]``, ``item_raw [I]``."""
    if cfg.split == "derrd":
        if cfg.rating_threshold is not None:
            raise ConfigError("data.rating_threshold is set, but DE-RRD's split has no ratings; set it to null")
        progress(f"[data] reading DE-RRD split from {src.paths[0]}")
        ignored = [f"{k}={getattr(cfg, k)}" for k in ("min_user_interactions", "min_item_interactions")
                   if getattr(cfg, k) > 1]
        if ignored:
            progress(f"[data] published split used as given; ignoring {', '.join(ignored)}")
        split = load_derrd_split(src.paths[0])
        ident_u = np.arange(split.num_users, dtype=np.int64)
        ident_i = np.arange(split.num_items, dtype=np.int64)
        return split, ident_u, ident_i

    progress(f"[data] reading {src.name} ({src.reader}) from {', '.join(str(p) for p in src.paths)}")
    inter = _read(src)
    progress(f"[data] read {_stats(inter)}")
    if cfg.rating_threshold is not None:
        inter = binarise(inter, cfg.rating_threshold)
        progress(f"[data] binarise rating >= {cfg.rating_threshold}: {_stats(inter)}")
    n0 = len(inter)
    inter = dedup(inter)
    if len(inter) != n0:
        progress(f"[data] dedup: dropped {n0 - len(inter):,} repeated (user, item) rows")
    inter = kcore(inter, cfg.min_user_interactions, cfg.min_item_interactions)
    if len(inter) == 0:
        raise ConfigError(
            f"no interactions left after k-core (user >= {cfg.min_user_interactions}, "
            f"item >= {cfg.min_item_interactions}); lower data.min_*_interactions"
        )
    bounds = f"user >= {cfg.min_user_interactions}, item >= {cfg.min_item_interactions}"
    progress(f"[data] k-core ({bounds}): {_stats(inter)}")
    inter, user_raw, item_raw = remap(inter)
    U, I = len(user_raw), len(item_raw)
    if cfg.split == "loo":
        split = leave_one_out(inter, U, cfg.order, cfg.seed, num_items=I, user_raw=user_raw)
    else:
        split = ratio_split(inter, cfg.ratios, cfg.order, cfg.seed, num_users=U, num_items=I)
    return split, user_raw, item_raw


def _counts(split: Split) -> dict[str, int]:
    return {
        "users": split.num_users,
        "items": split.num_items,
        "interactions": len(split.train) + len(split.valid) + len(split.test),
        "train": len(split.train),
        "valid": len(split.valid),
        "test": len(split.test),
        "users_without_valid": split.users_without("valid"),
        "users_without_test": split.users_without("test"),
    }


# --------------------------------------------------------------------------------------------- write
def _write_rows(directory: Path, inter: Interactions) -> None:
    directory.mkdir()
    cols = {"user": inter.user, "item": inter.item}
    if inter.timestamp is not None:
        cols["timestamp"] = inter.timestamp
    n = len(inter)
    for k, lo in enumerate(range(0, max(n, 1), ROWS_PER_PART)):  # an empty split still gets one (empty) part
        table = pa.table({c: pa.array(v[lo : lo + ROWS_PER_PART], type=pa.int64()) for c, v in cols.items()})
        pq.write_table(table, directory / f"part-{k:05d}.parquet")


def _write_negatives(path: Path, negatives: np.ndarray) -> None:
    U, n = negatives.shape
    items = pa.FixedSizeListArray.from_arrays(pa.array(negatives.reshape(-1), type=pa.int64()), n)
    table = pa.table({"user": pa.array(np.arange(U, dtype=np.int64)), "items": items})
    pq.write_table(table, path, row_group_size=NEG_ROWS_PER_GROUP)  # small groups: bounded memory on read


def _write_map(path: Path, raw: np.ndarray) -> None:
    pq.write_table(pa.table({"id": np.arange(len(raw), dtype=np.int64), "raw_id": raw.astype(np.int64)}), path)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(manifest: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return manifest is not None and all(manifest.get(k) == v for k, v in identity.items())


def _write_atomic(target: Path, write: Callable[[Path], None], identity: dict[str, Any]) -> bool:
    """Run ``write(tmp)`` in a temp dir beside ``target`` and rename it into place. False: a concurrent writer won."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():  # stale or corrupt output with the same hash: move it aside, then swap
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return True
        try:
            os.rename(tmp, target)
        except OSError:
            if _matches(_read_manifest(target), identity):  # another process finished the same dataset first
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(data_cfg: DataConfig, prepared_root: str | Path, progress: Callable[[str], None] = print) -> Path:
    """Prepare ``data_cfg`` under ``prepared_root`` and return the prepared directory (see the module docstring).

    A no-op (returns the path, logs "up to date") when the target exists with a matching manifest: same format
    version, same params and same source checksums.
    """
    t0 = time.perf_counter()
    src = _resolve_source(data_cfg)
    source = {"files": [{"path": _rel(f, src.root), "sha256": file_checksum(f).split(":", 1)[1]} for f in src.files]}
    params = _params(data_cfg, src)
    identity = {"format_version": FORMAT_VERSION, "dataset": data_cfg.dataset, "params": params, "source": source}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(prepared_root).resolve() / f"{data_cfg.dataset}__{data_cfg.split}__{digest}"
    if _matches(_read_manifest(target), identity):
        progress(f"[data] {target.name}: up to date")
        return target

    split, user_raw, item_raw = _build(data_cfg, src, progress)
    counts = _counts(split)
    progress(
        f"[data] split {data_cfg.split}"
        + (f" ({data_cfg.order})" if data_cfg.split != "derrd" else "")
        + f": {counts['users']:,} users, {counts['items']:,} items, train/valid/test = "
        f"{counts['train']:,} / {counts['valid']:,} / {counts['test']:,} "
        f"({counts['users_without_valid']:,} users without valid, {counts['users_without_test']:,} without test)"
    )
    n = data_cfg.num_eval_negatives
    negatives = None
    if n > 0:
        t1 = time.perf_counter()
        all_u = np.concatenate([split.train.user, split.valid.user, split.test.user])
        all_i = np.concatenate([split.train.item, split.valid.item, split.test.item])
        csr = user_items_csr(all_u, all_i, split.num_users)
        negatives = sample_eval_negatives(csr, split.num_items, n, data_cfg.seed, user_raw=user_raw)
        progress(f"[data] negatives: {negatives.shape[0]:,} users x {n} in {time.perf_counter() - t1:.1f}s")

    manifest = identity | {
        "counts": counts,
        "num_eval_negatives": n,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": rayrec.__version__,
    }

    def write(tmp: Path) -> None:
        for name in SPLITS:
            _write_rows(tmp / name, getattr(split, name))
        if negatives is not None:
            _write_negatives(tmp / "negatives.parquet", negatives)
        _write_map(tmp / "user_map.parquet", user_raw)
        _write_map(tmp / "item_map.parquet", item_raw)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks completeness

    if _write_atomic(target, write, identity):
        progress(f"[data] written {target} in {time.perf_counter() - t0:.1f}s")
    else:
        progress(f"[data] {target.name}: written by another process meanwhile (up to date)")
    return target


# --------------------------------------------------------------------------------------------- load
@dataclass
class PreparedData:
    """A prepared dataset in memory (ids contiguous: users ``0..num_users-1``, items ``0..num_items-1``)."""

    path: Path
    manifest: dict[str, Any]
    num_users: int
    num_items: int
    train_user: np.ndarray  # [N_train] int64
    train_item: np.ndarray  # [N_train] int64
    valid_user: np.ndarray  # [N_valid] int64
    valid_item: np.ndarray  # [N_valid] int64
    test_user: np.ndarray  # [N_test] int64
    test_item: np.ndarray  # [N_test] int64
    negatives: np.ndarray | None  # [U, n] int64, each row sorted; None when num_eval_negatives == 0

    def csr(self, splits: tuple[str, ...] = ("train",)) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr [U+1], indices [nnz])`` of the union of ``splits``; indices sorted per user."""
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; expected a subset of {SPLITS}")
        user = np.concatenate([getattr(self, f"{s}_user") for s in splits]) if splits else np.empty(0, np.int64)
        item = np.concatenate([getattr(self, f"{s}_item") for s in splits]) if splits else np.empty(0, np.int64)
        return user_items_csr(user, item, self.num_users)

    def split_path(self, name: str) -> Path:
        """Directory of a split's parquet parts, e.g. for ``ray.data.read_parquet``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.path / name

    def user_raw(self) -> np.ndarray:
        """Raw user id of every contiguous user id ``[U]``."""
        return _read_map(self.path / "user_map.parquet", self.num_users)

    def item_raw(self) -> np.ndarray:
        """Raw item id of every contiguous item id ``[I]``."""
        return _read_map(self.path / "item_map.parquet", self.num_items)


def _read_map(path: Path, size: int) -> np.ndarray:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing id map of a prepared dataset (run prepare again)")
    t = pq.read_table(path, columns=["id", "raw_id"])
    ids = t.column("id").to_numpy()
    if len(ids) != size or not np.array_equal(ids, np.arange(size)):
        raise ArtifactError(f"{path}: expected ids 0..{size - 1} in order")
    return t.column("raw_id").to_numpy()


def _read_split(directory: Path, expected: int, U: int, I: int) -> tuple[np.ndarray, np.ndarray]:
    parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    if not parts:
        raise ArtifactError(f"{directory}: missing split directory or parquet parts (run prepare again)")
    tables = [pq.read_table(p, columns=["user", "item"]) for p in parts]
    user = np.concatenate([t.column("user").to_numpy() for t in tables]).astype(np.int64)
    item = np.concatenate([t.column("item").to_numpy() for t in tables]).astype(np.int64)
    if len(user) != expected:
        raise ArtifactError(f"{directory}: {len(user)} rows, manifest says {expected} (partial or modified output)")
    if len(user) and (user.min() < 0 or user.max() >= U or item.min() < 0 or item.max() >= I):
        raise ArtifactError(f"{directory}: ids out of range [0, {U}) x [0, {I})")
    return user, item


def _read_negatives(f: Path, U: int, n: int) -> np.ndarray:
    """``[U, n]`` negatives, decoded row group by row group into one preallocated array."""
    if not f.is_file():
        raise ArtifactError(f"{f}: missing (manifest says {n} negatives per user); run prepare again")
    pf = pq.ParquetFile(f)
    t = pf.schema_arrow.field("items").type
    if pf.metadata.num_rows != U or not pa.types.is_fixed_size_list(t) or t.list_size != n:
        raise ArtifactError(f"{f}: expected {U} rows (one per user) of {n} items, found {pf.metadata.num_rows} of {t}")
    out = np.empty((U, n), dtype=np.int64)  # [U, n]
    lo = 0
    for batch in pf.iter_batches(batch_size=NEG_ROWS_PER_GROUP, columns=["user", "items"]):
        hi = lo + batch.num_rows
        if not np.array_equal(batch.column("user").to_numpy(), np.arange(lo, hi)):
            raise ArtifactError(f"{f}: rows must be users 0..{U - 1} in order")
        out[lo:hi] = batch.column("items").flatten().to_numpy().reshape(-1, n)
        lo = hi
    return out


def load_prepared(path: str | Path) -> PreparedData:
    """Read a directory written by :func:`prepare`; :class:`ArtifactError` when it is missing or inconsistent."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"prepared dataset not found: {p} (run rayrec.data.prepare(cfg.data, ...) first)")
    manifest = _read_manifest(p)
    if manifest is None:
        raise ArtifactError(
            f"{p}: no readable manifest.json, so not a (complete) prepared dataset; delete it and run prepare again"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p}: format_version {manifest.get('format_version')} != {FORMAT_VERSION} of this rayrec; "
            "run prepare again"
        )
    counts = manifest["counts"]
    U, I = int(counts["users"]), int(counts["items"])
    arrays = {}
    for name in SPLITS:
        arrays[f"{name}_user"], arrays[f"{name}_item"] = _read_split(p / name, int(counts[name]), U, I)
    n = int(manifest["num_eval_negatives"])
    negatives = _read_negatives(p / "negatives.parquet", U, n) if n > 0 else None
    if negatives is not None:  # a candidate that is one of the user's positives would inflate every metric
        pos = np.concatenate([arrays[f"{s}_user"] * I + arrays[f"{s}_item"] for s in SPLITS])  # [P] user*I+item
        neg = np.repeat(np.arange(U, dtype=np.int64), n) * I + negatives.reshape(-1)  # [U*n]
        hit = np.isin(neg, pos)
        if hit.any():
            k = int(np.flatnonzero(hit)[0])
            raise ArtifactError(f"{p / 'negatives.parquet'}: user {k // n}'s evaluation candidates include item "
                                f"{negatives.reshape(-1)[k]}, one of its positives; delete {p} and run prepare again")
    return PreparedData(path=p, manifest=manifest, num_users=U, num_items=I, negatives=negatives, **arrays)
