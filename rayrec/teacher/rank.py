"""The teacher's distributed ranking artifact: every user's top-N items, and k nearest users and items.

Runs in Ray Train workers (one ``TorchTrainer`` over the teacher's checkpoint; no training). Every worker loads
the frozen teacher *row-wise* sharded (whatever sharding it was trained with: DCP reshards on load), so rank ``r``
holds a contiguous block of user rows and a contiguous block of item rows and nothing else:

- **top-N**: rank ``r`` ranks the users it holds, ``rank.user_chunk`` at a time. Each step all-gathers the
  ranks' user vectors, scores them against the local item rows only (train items masked), keeps a partial top-N
  and merges the ranks' partial lists (:func:`rayrec.sharding.ranking.sharded_topk`). No worker holds the item
  table or the ``[users, items]`` score matrix. BPR scores by dot product; NeuMF by its GMF + MLP head, split so
  that the MLP's user half is computed once per user and its item half once per local item. LightGCN ranks its
  propagated rows: each rank's layer-mean block comes from ``L`` propagation steps over the row-sharded tables
  (:mod:`rayrec.models.sharded_lightgcn`), then scores by dot product like BPR.
- **neighbours**: the same step with the user (or item) rows as both queries and keys, the entity itself
  excluded. Representations: BPR's embedding; LightGCN's propagated one; NeuMF's GMF and MLP embeddings side
  by side. With ``rank.neighbor_pca`` they are first projected on the top principal components of the full
  table (centred; the mean and the ``[D, D]`` covariance are all-reduced, so no rank gathers rows). Metric:
  Euclidean (MKD's NKD), cosine or dot; scores are similarities (Euclidean: minus the squared distance).

Output (one directory, written atomically, manifest last; see :mod:`rayrec.artifacts`)::

    topn/part-<rank>.parquet            user int64, items list<int64>[<=N], scores list<float32>  best first
    user_neighbors/part-<rank>.parquet  user int64, neighbors list<int64>[k], scores list<float32>
    item_neighbors/part-<rank>.parquet  item int64, neighbors list<int64>[k], scores list<float32>
    manifest.json                       teacher checkpoint, prepared data, config, counts, timings, checksums

A user with fewer than N admissible items gets a shorter list. Ids are the prepared dataset's contiguous ids
(its ``user_map`` / ``item_map`` give the raw ids). Workers write their parts straight into the temporary
directory, so on a multi-node cluster ``storage_root`` must be a filesystem every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rayrec.artifacts import check_checkpoint, commit_dir, read_manifest, temp_dir_for
from rayrec.config import ExperimentConfig, RankConfig, build, resolve_storage_root
from rayrec.distributed import all_reduce
from rayrec.errors import ArtifactError, ConfigError
from rayrec.sharding.ranking import sharded_topk
from rayrec.topk import dot_scores

KIND = "teacher_ranking"
RERUN = "jobs/rank_teacher.py (rayrec.teacher.rank_teacher)"


# --------------------------------------------------------------------------------------------- worker side
@dataclass
class TeacherBlocks:
    """This rank's row blocks of the teacher: users ``[u0, u0 + U_r)`` and items ``[i0, i0 + I_r)``."""

    users: Tensor  # [U_r, D_q] (NeuMF: GMF | MLP side by side)
    user_offset: int
    items: Tensor  # [I_r, D_k]
    item_offset: int
    score_fn: Callable[[Tensor, Tensor], Tensor] | None  # None: dot product


def _neumf_scorer(model, dim: int, budget_elems: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """NeuMF's score of queries ``[Q, 2D]`` (gmf_u | mlp_u) against keys ``[I_r, 2D]`` (gmf_i | mlp_i), through
    :class:`rayrec.models.neumf.SplitHead` (user and item halves of the MLP's first layer computed once each)."""
    from rayrec.models.neumf import SplitHead

    head = SplitHead(model.mlp, model.predict, dim, budget_elems)
    return lambda q, k: head.block(head.query(q), head.key(k))


def teacher_blocks(teacher, name: str, dim: int) -> TeacherBlocks:
    """Row blocks of a row-wise sharded teacher (``FrozenTeacher``) and its scoring function."""
    from rayrec.sharding import local_row_block

    dmp = teacher.dmp
    if name == "bpr":
        (u, uo), (i, io) = local_row_block(dmp, "user"), local_row_block(dmp, "item")
        return TeacherBlocks(u, uo, i, io, None)
    if name == "neumf":
        (gu, uo), (mu, uo2) = local_row_block(dmp, "gmf_user"), local_row_block(dmp, "mlp_user")
        (gi, io), (mi, io2) = local_row_block(dmp, "gmf_item"), local_row_block(dmp, "mlp_item")
        if (uo, io) != (uo2, io2) or gu.shape != mu.shape or gi.shape != mi.shape:
            raise RuntimeError("NeuMF's GMF and MLP tables were sharded on different row blocks")
        return TeacherBlocks(torch.cat([gu, mu], 1), uo, torch.cat([gi, mi], 1), io, _neumf_scorer(teacher.model, dim))
    if name == "lightgcn":  # the propagated (layer-mean) row blocks, not the ID tables (collective: L exchanges)
        with torch.no_grad():
            (u, uo), (i, io) = teacher.model.propagated_blocks()
        return TeacherBlocks(u, uo, i, io, None)
    raise ValueError(f"no ranking for teacher model {name!r}")


def _lockstep_chunks(n: int, chunk: int) -> int:
    return int(all_reduce(torch.tensor([-(-n // chunk)]), torch.distributed.ReduceOp.MAX)[0])


def pca_project(rows: Tensor, n_components: int, total_rows: int) -> Tensor:
    """Project this rank's rows ``[n_r, D]`` on the top principal components of the whole (row-sharded) table.

    Centred like sklearn's PCA; ``n_components`` is clamped to ``min(n_components, D, total_rows)``. Collective:
    only ``[D]`` sums and a ``[D, D]`` scatter matrix are all-reduced. Component signs are fixed so that each
    component's largest-magnitude coefficient is positive (the same on every rank and every run).
    """
    x = rows.double()
    D = x.shape[1]
    k = min(n_components, D, total_rows)
    mean = all_reduce(x.sum(0)) / total_rows  # [D]
    xc = x - mean
    cov = all_reduce(xc.T @ xc)  # [D, D]
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, -k:].flip(1)  # [D, k], largest first
    sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return (xc @ comps).to(rows.dtype)  # [n_r, k]


def neighbor_scorer(metric: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Similarity of queries ``[Q, D]`` to keys ``[K, D]``: Euclidean (``-||q - k||²``), cosine or dot."""
    if metric == "dot":
        return lambda q, k: dot_scores(q, k.T)
    if metric == "cosine":
        return lambda q, k: dot_scores(F.normalize(q, dim=1), F.normalize(k, dim=1).T)
    if metric == "euclidean":
        return lambda q, k: 2 * dot_scores(q, k.T) - (k * k).sum(1) - (q * q).sum(1, keepdim=True)
    raise ValueError(f"unknown neighbour metric {metric!r}")


class _PartWriter:
    """Streams ``(id, list, scores)`` rows of one rank into ``<dir>/part-<rank>.parquet``."""

    def __init__(self, path: Path, id_name: str, list_name: str) -> None:
        import pyarrow as pa

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.id_name, self.list_name = path, id_name, list_name
        self.schema = pa.schema([(id_name, pa.int64()), (list_name, pa.list_(pa.int64())),
                                 ("scores", pa.list_(pa.float32()))])
        self.writer = None
        self.rows = 0

    def write(self, ids: Tensor, lists: Tensor, scores: Tensor) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema)
        keep = lists >= 0  # [B, k] slots holding an admissible id (kept ids are a prefix of each row)
        lengths = keep.sum(1).numpy()
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = pa.array(lists[keep].numpy())
        flat_scores = pa.array(scores[keep].float().numpy())
        table = pa.table({
            self.id_name: pa.array(ids.numpy()),
            self.list_name: pa.ListArray.from_arrays(pa.array(offsets), flat_ids),
            "scores": pa.ListArray.from_arrays(pa.array(offsets), flat_scores),
        }, schema=self.schema)
        self.writer.write_table(table)
        self.rows += len(ids)

    def close(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:  # a rank with no rows still writes an empty part (the schema)
            pq.write_table(self.schema.empty_table(), self.path)
        else:
            self.writer.close()


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def rank_blocks(blocks: TeacherBlocks, rc: RankConfig, num_users: int, num_items: int, out: Path,
                exclude: tuple[Tensor, Tensor] | None, rank: int = 0) -> dict:
    """Write this rank's parts of the top-N and neighbour lists into ``out`` (collective). Returns timings."""
    timings = {}
    indptr, indices = exclude if exclude is not None else (None, None)
    N = min(rc.top_n, num_items)
    t0 = time.perf_counter()
    U_r = blocks.users.shape[0]
    n_chunks = _lockstep_chunks(U_r, rc.user_chunk)
    writer = _PartWriter(out / "topn" / f"part-{rank:05d}.parquet", "user", "items")
    report_every = max(1, n_chunks // 10)
    for c in range(n_chunks):
        a, b = min(c * rc.user_chunk, U_r), min((c + 1) * rc.user_chunk, U_r)
        ids = torch.arange(blocks.user_offset + a, blocks.user_offset + b)
        s, i = sharded_topk(blocks.users[a:b], ids, blocks.items, blocks.item_offset, N, indptr, indices,
                            score_fn=blocks.score_fn)
        if b > a:
            writer.write(ids, i, s)
        if (c + 1) % report_every == 0 or c + 1 == n_chunks:
            el = time.perf_counter() - t0
            _log(rank, f"[rank] top-{N}: chunk {c + 1}/{n_chunks} ({(c + 1) / n_chunks:.0%}) {el:.1f}s")
    writer.close()
    timings["topn_s"] = time.perf_counter() - t0

    for kind, k, rows, offset, total in (
        ("user", rc.user_neighbors, blocks.users, blocks.user_offset, num_users),
        ("item", rc.item_neighbors, blocks.items, blocks.item_offset, num_items),
    ):
        if k <= 0:
            continue
        t0 = time.perf_counter()
        k = min(k, total - 1)
        feats = pca_project(rows, rc.neighbor_pca, total) if rc.neighbor_pca else rows
        score_fn = neighbor_scorer(rc.neighbor_metric)
        n_r = feats.shape[0]
        writer = _PartWriter(out / f"{kind}_neighbors" / f"part-{rank:05d}.parquet", kind, "neighbors")
        for c in range(_lockstep_chunks(n_r, rc.user_chunk)):
            a, b = min(c * rc.user_chunk, n_r), min((c + 1) * rc.user_chunk, n_r)
            ids = torch.arange(offset + a, offset + b)
            s, i = sharded_topk(feats[a:b], ids, feats, offset, k, exclude_self=True, score_fn=score_fn)
            if b > a:
                writer.write(ids, i, s)
        writer.close()
        timings[f"{kind}_neighbors_s"] = time.perf_counter() - t0
        _log(rank, f"[rank] {k} nearest {kind}s ({rc.neighbor_metric}"
                   f"{f', PCA {feats.shape[1]}' if rc.neighbor_pca else ''}) in {timings[f'{kind}_neighbors_s']:.1f}s")
    return timings


def rank_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker: load the frozen teacher row-wise, write this rank's parts (see the module docstring)."""
    import ray.train
    import ray.train.torch

    from rayrec.data.prepared import load_prepared
    from rayrec.runtime import quiet_ray_loggers
    from rayrec.teacher.frozen import load_frozen_teacher

    quiet_ray_loggers()
    cfg: ExperimentConfig = build(ExperimentConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.threads_per_worker or max(1, (os.cpu_count() or 1) // max(world, 1))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    t0 = time.perf_counter()
    pd = load_prepared(config["prepared"])
    exclude = None
    if cfg.rank.exclude == "train":
        indptr, indices = pd.csr(("train",))
        exclude = (torch.from_numpy(indptr), torch.from_numpy(indices))
    teacher = load_frozen_teacher(config["checkpoint"], name=cfg.model.name, num_users=pd.num_users,
                                  num_items=pd.num_items, dim=cfg.model.dim, sharding_type="row_wise", device=device)
    if cfg.model.name == "lightgcn":  # propagates over the graph it was trained on
        teacher.model.set_graph(pd.train_user, pd.train_item, layers=cfg.model.layers)
    blocks = teacher_blocks(teacher, cfg.model.name, cfg.model.dim)
    load_s = time.perf_counter() - t0
    _log(rank, f"[rank] teacher {cfg.model.name} d={cfg.model.dim} loaded row-wise on {world} worker(s) in "
               f"{load_s:.1f}s; rank 0 holds users [{blocks.user_offset}, {blocks.user_offset + len(blocks.users)}) "
               f"items [{blocks.item_offset}, {blocks.item_offset + len(blocks.items)})")
    with torch.no_grad():
        timings = rank_blocks(blocks, cfg.rank, pd.num_users, pd.num_items, Path(config["out"]), exclude, rank)
    timings["load_s"] = load_s
    return {"timings": timings, "world_size": world} if rank == 0 else None


# --------------------------------------------------------------------------------------------- driver side
def _teacher_model_files(checkpoint: Path, dim: int | None = None, key: str = "model.dim") -> Path:
    """The DCP directory of a complete sharded teacher checkpoint. With ``dim``: its tables must have that many
    columns (read from the DCP metadata, no process group needed), else a ConfigError naming ``key``."""
    check_checkpoint(checkpoint, "jobs/train_teacher.py")
    shards = checkpoint / "model" if (checkpoint / "model" / ".metadata").exists() else checkpoint
    if not (shards / ".metadata").exists():
        hint = " (a dense checkpoint: train the teacher with model.sharding set)" if (checkpoint / "model.pt").exists() else ""
        raise ArtifactError(f"{checkpoint}: not a sharded teacher checkpoint (no model/.metadata){hint}")
    if dim is not None:
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
        tables = {k: tuple(v.size) for k, v in meta.items()
                  if k.endswith(".weight") and ".embeddings." in k and hasattr(v, "size") and len(v.size) == 2}
        wrong = {k: s for k, s in tables.items() if s[1] != dim}
        if wrong:
            k, s = next(iter(wrong.items()))
            raise ConfigError(f"{key}={dim} but the teacher checkpoint {checkpoint} has tables of d={s[1]} "
                              f"({k}: {s[0]} x {s[1]}); set {key}={s[1]} or pass the matching checkpoint")
    return shards


def _reusable(out: Path, checkpoint: Path, prepared: Path, cfg: ExperimentConfig) -> str | None:
    """Why the committed ranking at ``out`` cannot stand for this run's, or None when it can (same teacher
    checkpoint, prepared data, teacher model and ``rank.*`` config, every file as its manifest lists)."""
    try:
        m = read_manifest(out, KIND, RERUN)
    except ArtifactError as e:
        return str(e)
    want = {"teacher_checkpoint": str(checkpoint), "prepared": str(prepared.resolve()),
            "model": {"name": cfg.model.name, "dim": cfg.model.dim}, "rank": dataclasses.asdict(cfg.rank)}
    want = json.loads(json.dumps(want, default=str))  # as the manifest stores it (tuples as lists)
    diff = [k for k, v in want.items() if m.get(k) != v]
    return f"it was made with another {', '.join(diff)}" if diff else None


def rank_teacher(cfg: ExperimentConfig, checkpoint: str | Path, *, prepared: str | Path | None = None,
                 out: str | Path | None = None, resume: bool = False,
                 progress: Callable[[str], None] = print) -> Path:
    """Compute the ranking artifact of the teacher in ``checkpoint`` (``cfg.model`` describes it) with
    ``cfg.ray.num_workers`` Ray Train workers; return the committed directory. ``resume``: keep a complete ranking
    already at ``out`` when it was made from the same checkpoint, prepared data and config (else rank again)."""
    checkpoint = Path(checkpoint).resolve()
    _teacher_model_files(checkpoint, cfg.model.dim)  # fail before starting anything
    if cfg.ray.num_workers < 1:
        raise ConfigError("rank_teacher needs ray.num_workers >= 1 (the teacher is loaded sharded)")
    from rayrec.data.prepared import load_prepared, prepare
    from rayrec.train.fit import prepared_root

    from rayrec.runtime import init_ray

    init_ray(cfg.ray)  # a wrong cluster address fails here, before any data is prepared
    prepared = Path(prepared) if prepared is not None else prepare(cfg.data, prepared_root(cfg), progress=progress)
    pd = load_prepared(prepared)  # checks it before any worker starts
    out = Path(out) if out is not None else resolve_storage_root(cfg) / "rankings" / cfg.name
    if resume:
        why = _reusable(out, checkpoint, Path(prepared), cfg)
        if why is None:
            progress(f"[rank] {out}: complete, same teacher, data and config: kept (--resume)")
            return out
        progress(f"[rank] --resume: ranking again, {out} is not reusable: {why}")

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayrec.runtime import init_ray, worker_runtime_env

    init_ray(cfg.ray)
    tmp = temp_dir_for(out)
    rc = cfg.ray
    trainer = TorchTrainer(
        rank_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "checkpoint": str(checkpoint), "prepared": str(prepared),
                           "out": str(tmp)},
        scaling_config=ray.train.ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu,
                                               resources_per_worker={"CPU": rc.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo", timeout_s=rc.timeout_s),
        run_config=ray.train.RunConfig(
            name=f"rank-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(resolve_storage_root(cfg) / "ray_train"),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    progress(f"[rank] teacher {checkpoint} -> {out} ({rc.num_workers} worker(s))")
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = result.return_value or {}
    counts = {}
    import pyarrow.parquet as pq

    for sub in ("topn", "user_neighbors", "item_neighbors"):
        parts = sorted((tmp / sub).glob("part-*.parquet"))
        if parts:
            counts[sub] = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    if counts.get("topn") != pd.num_users:
        raise ArtifactError(f"ranking wrote {counts.get('topn')} users, expected {pd.num_users}; nothing committed")
    commit_dir(tmp, out, KIND, {
        "teacher_checkpoint": str(checkpoint),
        "prepared": str(Path(prepared).resolve()),
        "model": {"name": cfg.model.name, "dim": cfg.model.dim},
        "num_users": pd.num_users, "num_items": pd.num_items,
        "rank": dataclasses.asdict(cfg.rank),
        "top_n": min(cfg.rank.top_n, pd.num_items),
        "counts": counts,
        "world_size": info.get("world_size"),
        "timings": {**info.get("timings", {}), "total_s": time.perf_counter() - t0},
    })
    progress(f"[rank] wrote {out} ({', '.join(f'{k}: {v:,} rows' for k, v in counts.items())}) "
             f"in {time.perf_counter() - t0:.1f}s")
    return out


@dataclass
class Ranking:
    """A ranking artifact read back: ``items``/``scores`` ``[U, N]`` (``-1`` / ``-inf`` past a short list)."""

    path: Path
    manifest: dict
    items: np.ndarray  # [U, N] int64
    scores: np.ndarray  # [U, N] float32

    def neighbors(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [n, k], scores [n, k])`` of ``kind`` in ``user``/``item`` (rows in id order)."""
        sub = f"{kind}_neighbors"
        if sub not in self.manifest["counts"]:
            raise ArtifactError(f"{self.path}: no {kind} neighbours (rank.{kind}_neighbors was 0); run {RERUN}")
        n = self.manifest["num_users" if kind == "user" else "num_items"]
        return _read_lists(self.path / sub, kind, "neighbors", n)


def lists_from_tables(tables, id_name: str, list_name: str, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n, width], scores [n, width])`` from pyarrow tables of ``(id, list, scores)`` rows (any order;
    ``-1`` / ``-inf`` past a short list). Used for parquet parts and for batches streamed by Ray Data."""
    ids = np.full((n, width), -1, dtype=np.int64)
    scores = np.full((n, width), -np.inf, dtype=np.float32)
    for t in tables:
        if not t.num_rows:
            continue
        rows = t.column(id_name).to_numpy()
        lists = t.column(list_name).combine_chunks()
        sc = t.column("scores").combine_chunks()
        lens = lists.value_lengths().to_numpy()
        flat_rows = np.repeat(rows, lens)
        flat_cols = np.arange(len(flat_rows)) - np.repeat(np.cumsum(lens) - lens, lens)  # position in its row
        ids[flat_rows, flat_cols] = lists.flatten().to_numpy()
        scores[flat_rows, flat_cols] = sc.flatten().to_numpy()
    return ids, scores


def _read_lists(directory: Path, id_name: str, list_name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))]
    width = max((int(t.column(list_name).combine_chunks().value_lengths().to_numpy().max(initial=0))
                 for t in tables if t.num_rows), default=0)
    return lists_from_tables(tables, id_name, list_name, n, width)


def load_ranking(path: str | Path, verify: bool = False) -> Ranking:
    """Read a committed ranking artifact (refused without a complete manifest)."""
    p = Path(path)
    m = read_manifest(p, KIND, RERUN, verify=verify)
    items, scores = _read_lists(p / "topn", "user", "items", int(m["num_users"]))
    return Ranking(p, m, items, scores)
