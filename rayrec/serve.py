"""Serving: top-K modules for trained models, the exported student, and latency measurement.

:class:`TopK` wraps what serving needs and nothing else: for dot-product models (BPR-MF, LightGCN with its
propagated representations frozen at export time) the user and item matrices ``[U, D]``, ``[I, D]``; for NeuMF its
four tables and MLP. ``forward(users [B]) -> (scores [B, K], items [B, K])`` ranks every item. Training-only parts
(DE experts, projectors, selection networks) live in the method's ``method.pt`` and are never loaded here.

:func:`export_student` writes a servable artifact: ``student.pt2`` (``torch.export``; TorchScript ``student.ts``
where export fails), ``id_map.parquet`` files (internal id -> raw id of the prepared data) and a manifest with
checksums written last (:mod:`rayrec.artifacts`). :func:`load_exported` reads it back.

Dot models on a CPU score and rank through the fused kernel ``torch.ops.rayrec.dot_topk`` (:mod:`rayrec.kernels`,
:func:`fused_serving`), teacher and student alike; an exported graph keeps it as one node, so loading a ``.pt2``
without this module needs ``import rayrec.kernels`` first (it registers the op, with its fallback where the kernel
cannot be built). Without the kernel they score in cache-sized user x item blocks (:class:`TopK`, :class:`BlockedTopK`).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rayrec import kernels  # noqa: F401  (registers torch.ops.rayrec.dot_topk, which exported students call)
from rayrec.artifacts import check_checkpoint, commit_dir, read_manifest, temp_dir_for
from rayrec.errors import ArtifactError, ConfigError
from rayrec.topk import dot_scores, sorted_topk

KIND = "exported_student"
RERUN = "jobs/export.py --checkpoint <student run checkpoint>"


class TopK(nn.Module):
    """Top-``k`` items of every user in a batch, over all items (no training state).

    Scores are computed per chunk of ``item_chunk`` items (32k: a 16 MiB block of 128 users), each chunk's top ``k`` by
    the two-level :func:`rayrec.topk.sorted_topk` (one thread, 1024 users x 25k items, k = 20: 53 ms for one
    ``torch.topk``, 32 ms for the former consecutive groups of 64, 19 ms), merged with one last ``topk``; the item
    loop is static, so ``torch.export`` keeps it.
    Large batches go through :class:`BlockedTopK` (blocks of users, so a score block stays ~16 MiB).
    ``fused`` (dot models; set by :func:`serving_module` where the kernel builds): one
    ``torch.ops.rayrec.dot_topk`` call over every item instead, which never writes the scores."""

    def __init__(self, kind: str, tensors: dict[str, Tensor], k: int = 20, item_chunk: int = 1 << 15,
                 fused: bool = False) -> None:
        super().__init__()
        self.kind, self.k = kind, k
        # dot models on CPU: one fused score + top-k op over every item (rayrec.kernels.dot_topk), no [B, I] scores
        self.fused = fused and kind == "dot"
        if kind == "dot":
            self.register_buffer("users_m", tensors["user"].detach().clone().contiguous())  # [U, D]
            self.register_buffer("items_t", tensors["item"].detach().t().contiguous())  # [D, I]
            self.num_items = int(tensors["item"].shape[0])
        elif kind == "neumf":
            for name in ("gmf_user", "gmf_item", "mlp_user", "mlp_item", "mlp_w", "mlp_b", "pred_w", "pred_b"):
                self.register_buffer(name, tensors[name].detach().clone().contiguous())
            self.num_items = int(tensors["gmf_item"].shape[0])
        else:
            raise ValueError(f"unknown serving kind {kind!r}")
        n = self.num_items
        self.chunks = [(a, min(a + item_chunk, n)) for a in range(0, n, item_chunk)]

    def num_users(self) -> int:
        return int((self.users_m if self.kind == "dot" else self.gmf_user).shape[0])

    def scores(self, users: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Scores of ``users`` ``[B]`` for items ``start:stop`` (default all) -> ``[B, stop - start]``."""
        stop = self.num_items if stop is None else stop
        if self.kind == "dot":
            # [B, I_c]; GEMMs of 2k items for wide tables (rayrec.topk.dot_scores)
            return dot_scores(self.users_m[users], self.items_t[:, start:stop])
        B, n = users.shape[0], stop - start
        gmf = self.gmf_user[users].unsqueeze(1) * self.gmf_item[start:stop].unsqueeze(0)  # [B, I_c, D]
        x = torch.cat([self.mlp_user[users].unsqueeze(1).expand(B, n, -1),
                       self.mlp_item[start:stop].unsqueeze(0).expand(B, n, -1)], dim=-1)  # [B, I_c, 2D]
        h = torch.relu(x @ self.mlp_w.t() + self.mlp_b)  # [B, I_c, D]
        return (torch.cat([gmf, h], dim=-1) @ self.pred_w.t() + self.pred_b).squeeze(-1)  # [B, I_c]

    def forward(self, users: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "dot" and self.items_t.is_cuda:
            # a GPU: one GEMM and one two-level top-k over every item. Item chunks fit a CPU's caches; on a GPU they
            # only add kernel launches (H100, CiteULike, d=20, 1,024 users: the CPU-shaped graph 1.27 ms, one GEMM +
            # topk 0.69 ms; 1M items, 1 user: 12.4 vs 0.28 ms). Static when exported.
            return sorted_topk(self.users_m[users] @ self.items_t, self.k)  # [B, I] -> [B, k]
        if self.fused:
            return torch.ops.rayrec.dot_topk(self.users_m[users], self.items_t, self.k)  # [B, k] x 2
        values, items = [], []
        for a, b in self.chunks:
            s = self.scores(users, a, b)  # [B, I_c]
            v, i = sorted_topk(s, min(self.k, b - a))  # [B, k] best first (one plain topk for small chunks)
            values.append(v)
            items.append(i + a)
        if len(self.chunks) == 1:
            return values[0], items[0]  # a plain tuple: torch.export can save it
        v, pos = torch.topk(torch.cat(values, dim=1), self.k, dim=1)
        return v, torch.gather(torch.cat(items, dim=1), 1, pos)


class BlockedTopK(nn.Module):
    """A top-``k`` module applied to blocks of at most ``block`` users (each block's scores stay in cache-sized
    memory; one ``[B, I]`` block for 1024 users x 25k items would be 100 MiB). ``block=0``: one call. A batch is cut
    into ``ceil(B / block)`` near-equal blocks, not full blocks plus a remainder: 64 users at ``block`` 62 run as
    32 + 32 (4.0 ms p50 on CiteULike, d=20, 2 threads) rather than 62 + 2 (4.7 ms).

    ``gpu_block``: the block for users on a CUDA device (``None``: ``block``). A GPU has no cache to fit and pays a
    kernel launch per op of every block, so its blocks are sized by memory alone (:data:`GPU_BUDGET_MB`)."""

    def __init__(self, inner: nn.Module, block: int, gpu_block: int | None = None) -> None:
        super().__init__()
        self.inner, self.block = inner, block
        self.gpu_block = block if gpu_block is None else gpu_block

    def block_for(self, device: torch.device) -> int:
        """Users per block for a batch on ``device`` (0: the whole batch in one call)."""
        return self.gpu_block if device.type == "cuda" else self.block

    def forward(self, users: Tensor) -> tuple[Tensor, Tensor]:
        block = self.block_for(users.device)
        if not block or users.shape[0] <= block:
            return self.inner(users)
        outs = [self.inner(u) for u in users.tensor_split(-(-users.shape[0] // block))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def user_block(num_items: int, budget_mb: float = 16.0) -> int:
    """Users per serving block so one block's fp32 scores stay within ``budget_mb`` (at least 1)."""
    return max(1, int(budget_mb * 2**20 / 4 / max(num_items, 1)))


@torch.no_grad()
def serving_module(model: nn.Module, k: int = 20) -> BlockedTopK:
    """The top-``k`` serving module of a trained dense model (BPR, LightGCN: propagated once; NeuMF): a
    :class:`TopK` in user blocks (:class:`BlockedTopK`)."""
    from rayrec.models import BPR, LightGCN, NeuMF

    model.eval()
    if isinstance(model, LightGCN):
        U, I = model.propagate()
        top = TopK("dot", {"user": U.detach().clone(), "item": I.detach().clone()}, k)
    elif isinstance(model, BPR):
        top = TopK("dot", {"user": model.user_emb.weight.detach().clone(),
                           "item": model.item_emb.weight.detach().clone()}, k)
    elif isinstance(model, NeuMF):
        top = TopK("neumf", {"gmf_user": model.gmf_user.weight, "gmf_item": model.gmf_item.weight,
                             "mlp_user": model.mlp_user.weight, "mlp_item": model.mlp_item.weight,
                             "mlp_w": model.mlp.weight, "mlp_b": model.mlp.bias,
                             "pred_w": model.predict.weight, "pred_b": model.predict.bias}, k)
    else:
        raise TypeError(f"no serving module for {type(model).__name__}")
    if top.kind == "dot":
        if not (torch.isfinite(top.users_m).all() and torch.isfinite(top.items_t).all()):
            raise ValueError(f"{type(model).__name__} has non-finite embeddings: it cannot be served")
        if fused_serving():
            top.fused = True  # one fused op over every item, threads split the users: no user blocks
            return BlockedTopK(top, 0, user_block(top.num_items, GPU_BUDGET_MB))
    # NeuMF builds [B, I, ~4D] intermediates per block; dot models only the [B, I] scores
    width = 1 if top.kind == "dot" else 4 * top.gmf_item.shape[1]
    per_user = min(top.num_items, 1 << 15) * width
    gpu_per_user = top.num_items if top.kind == "dot" else per_user  # a dot model scores every item at once there
    return BlockedTopK(top, user_block(per_user, serving_budget_mb(top)), user_block(gpu_per_user, GPU_BUDGET_MB))


# MiB of scores per serving block on a GPU (memory is the only limit there: on an H100, 1,024 users x 1M items at d=20
# took 4.9 ms in one call, 5.2 in blocks of 256, 5.7 in blocks of 128); 1,024 users of 1M items are one call
GPU_BUDGET_MB = 4096.0


def fused_serving() -> bool:
    """Whether dot models serve through the fused CPU kernel (:func:`rayrec.kernels.dot_topk`): where it builds.
    It is faster than the blocked GEMM + two-level top-k for every width and batch measured (2 threads, top-20,
    p50-like min of repeats, ms, blocked path -> fused): CiteULike's 25,182 items, d=20: 1 user 0.13 -> 0.07, 64 users
    1.36 -> 0.62, 1,024 users 20.5 -> 11.0; d=200: 0.52 -> 0.54, 7.5 -> 6.4, 94 -> 86; 1M items, d=20: 6.2 -> 3.9,
    56 -> 22, 2,133 -> 269; d=200: 36 -> 32, 290 -> 198, 4,534 -> 2,450 (the kernel's first, 4-user tile; the
    6-user tile took 1,024 users on CiteULike to 7.5 ms at d=20 and 51 ms at d=200). So the teacher and the student
    both use it, and the blocked path below serves where no C++ compiler is."""
    return kernels.native() is not None


NARROW_DIM = 64  # below this many dims a dot model's scores cost D multiply-adds each: writing them is the cost


def serving_budget_mb(top: TopK) -> float:
    """MiB of scores per serving block: 6 for narrow dot models (``D < 64``, e.g. a d=20 student), 16 otherwise.
    A narrow product is bound by writing and re-reading its ``[B, I]`` scores, so smaller blocks that stay in the
    cache win; a wide one (the teacher) is compute-bound and its GEMMs gain from more users per call. Quiet
    machine, 2 threads, top-20 of 1,024 users, p50 (blocks of users): CiteULike (25,182 items) d=20: 166 users
    (16 MiB) 30.5 ms, 64 22.6, 48 21.5, 32 22.7, 16 33.7; 1M items (32k-item chunks) d=20: 128 1169 ms, 64 932,
    32 962; d=200: 25k items 83 users 118 ms, 166 94, 332 84-90, 1,024 118; 1M items 128 5.2 s, 256 6.8 s. The
    gain is not stable on this VM: a later sweep gave 62 users 21.4 ms against 166 21.2, and 1M items 48 users
    against 128 went 866 vs 706 ms in one run and 1054 vs 1783 ms in the next (host memory traffic drifts)."""
    return 6.0 if top.kind == "dot" and top.items_t.shape[0] < NARROW_DIM else 16.0


def _summary(checkpoint: Path) -> dict:
    check_checkpoint(checkpoint, "the training job (train_teacher / distill)")
    p = Path(checkpoint) / "summary.json"
    if not p.exists():
        raise ArtifactError(f"{checkpoint}: no summary.json (not a finished run's final checkpoint); rerun the job "
                            "that trained it")
    return json.loads(p.read_text())


def load_dense_model(checkpoint: str | Path, prepared: str | Path | None = None) -> nn.Module:
    """The trained model of a run's final checkpoint, as a dense model: a student (``model.pt``) or a sharded
    teacher (its DCP shards read into one process: small teachers only)."""
    from rayrec.data.prepared import load_prepared
    from rayrec.models import build_model

    ck = Path(checkpoint)
    s = _summary(ck)
    mc = s["config"]["model"]
    pd = load_prepared(prepared or s["prepared"]) if (prepared or s.get("prepared")) else None
    if pd is None:
        raise ArtifactError(f"{ck}: summary.json does not name its prepared data; pass prepared=")
    model = build_model(mc["name"], pd.num_users, pd.num_items, mc["dim"], layers=mc.get("layers", 3),
                        graph=(pd.train_user, pd.train_item))
    if (ck / "model.pt").exists():
        state = torch.load(ck / "model.pt", map_location="cpu")
    else:
        from rayrec.sharding.checkpoint import export_dense

        state = dense_model_state(export_dense(ck), mc["name"])
    model.load_state_dict(state)
    return model.eval()


def dense_model_state(raw: dict, name: str) -> dict:
    """A sharded teacher's state dict (keys as in training: ``model.ec.embeddings.<table>.weight``, dense layers)
    with the keys of the dense model ``name`` (``<table>_emb.weight``; NeuMF's ``<table>.weight``)."""
    state = {}
    for k, v in raw.items():
        if not k.startswith("model."):
            continue
        k = k[len("model."):]
        if k.startswith("ec.embeddings."):
            table = k.split(".")[2]
            k = f"{table}.weight" if name == "neumf" else f"{table}_emb.weight"
        state[k] = v
    return state


def export_student(checkpoint: str | Path, out: str | Path, k: int = 20, prepared: str | Path | None = None,
                   device: str | torch.device = "cpu") -> Path:
    """Export a trained student run for serving (see the module docstring); returns the committed directory.
    ``device``: where it will serve. The graph is traced there (a GPU graph scores every item in one GEMM, a CPU
    graph in cache-sized chunks); :func:`load_exported` can still move it anywhere."""
    from rayrec.data.prepared import load_prepared

    ck = Path(checkpoint)
    s = _summary(ck)
    device = _serving_device(device)
    model = load_dense_model(ck, prepared)
    module = serving_module(model, k).to(device)
    pd = load_prepared(prepared or s["prepared"])
    out = Path(out)
    tmp = temp_dir_for(out)
    try:
        example = (torch.arange(min(2, pd.num_users), device=device),)
        fmt, why = "torch.export", None
        try:
            ep = torch.export.export(module.inner, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            torch.export.save(ep, tmp / "student.pt2")
        except Exception as e:  # noqa: BLE001 - fall back to TorchScript, the reason recorded in the manifest
            fmt, why = "torchscript", f"{type(e).__name__}: {e}"[:500]
            torch.jit.save(torch.jit.trace(module.inner, example), tmp / "student.ts")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": np.arange(pd.num_users), "raw_id": pd.user_raw()}), tmp / "user_map.parquet")
        pq.write_table(pa.table({"id": np.arange(pd.num_items), "raw_id": pd.item_raw()}), tmp / "item_map.parquet")
        commit_dir(tmp, out, KIND, {
            "format": fmt, "k": k, "device": device.type, "user_block": module.block,
            "gpu_user_block": module.gpu_block, "fused_topk": bool(getattr(module.inner, "fused", False)),
            "model": s["config"]["model"], "num_users": pd.num_users,
            "num_items": pd.num_items, "num_parameters": sum(int(b.numel()) for b in module.buffers()),
            "source_checkpoint": str(ck.resolve()), "distill_method": s["config"].get("distill", {}).get("method"),
            "export_fallback_reason": why,
        })
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(module, manifest)`` of an exported student (refused without a complete manifest), on ``device``."""
    m = read_manifest(path, KIND, RERUN)
    p = Path(path)
    device = _serving_device(device)
    if m["format"] == "torch.export":
        inner = exported_on(torch.export.load(p / "student.pt2"), device)
    else:
        inner = torch.jit.load(p / "student.ts", map_location=device)
    block = int(m.get("user_block", 0))  # artifacts from before the GPU block keep the CPU one there too
    return BlockedTopK(inner, block, int(m.get("gpu_user_block", block))), m


def _serving_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; a clear error for a CUDA device this machine does not have."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"serving device {device} asked for, but torch sees no CUDA device on this machine "
                         "(export and load with device=cpu here)")
    return device


def exported_on(ep: torch.export.ExportedProgram, device: str | torch.device) -> nn.Module:
    """The callable module of ``ep`` on ``device``. An export made on the CPU bakes the CPU into the tensors its graph
    creates (``arange`` in the block top-k), which ``module.to("cuda")`` does not move: a CUDA batch then fails with
    "Expected all tensors to be on the same device". ``torch.export.passes.move_to_device_pass`` rewrites those too."""
    device = torch.device(device)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, device)
    return ep.module()


@torch.no_grad()
def latency(fn, users: Tensor, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """p50/p90/p99 wall time (ms) of ``fn(users)`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn(users)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(users)
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_ms": statistics.median(times), "p90_ms": q[89], "p99_ms": q[98]}
