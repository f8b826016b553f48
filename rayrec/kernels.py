"""Native CPU kernels, built on first use, behind torch ops and functions that work without them.

``torch.ops.rayrec.dot_topk(queries [B, D], keys_t [D, I], k) -> (values [B, k], ids [B, k])``: the ``k`` best
items of every row of ``queries @ keys_t``, best first. On CPU (float32) it runs the fused kernel of
``rayrec/csrc/dot_topk.cpp``, which never writes the ``[B, I]`` scores; anywhere else, or where the kernel cannot be
built, it runs :func:`rayrec.topk.sorted_topk` over one matmul. Same values up to float summation order (the kernel
adds the D products in order with FMAs, a BLAS GEMM in its own order); ties go to the lower item id in the kernel,
in any order in the fallback.

The op is a registered ``torch.library`` custom op, so ``torch.export`` keeps it as one node: an exported student
(``rayrec.serve``) loads wherever ``rayrec`` imports, and runs the kernel where it can be built. The same tiles
count instead of selecting for the full-ranking evaluation (``dot_count``: per row, the items scored not below each
held-out item's score; ``dot_pairs``: the same sums for given pairs; :meth:`rayrec.eval.metrics.HeldoutRanker.
positions_dot`).

For training (``rayrec/csrc/list_rank.cpp``): :func:`rrd_nll`, RRD's relaxed ranking loss over each user's list of
gathered dot products, with a backward that scatters into both tables in one deterministic pass; ``csr_contains``,
the negative samplers' membership test, and ``csr_sample_distinct``, their draw without replacement
(:class:`rayrec.train.sampling.NegativeSampler`); ``gumbel_topk_head``, the first ranks of RRD's rank-discounted
draw (:func:`rayrec.distill.lists.rank_discounted`). All have plain-PyTorch fallbacks.

The build (``torch.utils.cpp_extension.load``, needs a C++ compiler and ninja; about 40 s on 2 cores;
``scripts/install.sh`` does it once) is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
compiled for the machine it runs on (``-march=native``: AVX-512 where the CPU has it, a portable loop elsewhere) and
named after the CPU (:func:`_cpu_tag`) and a hash of the sources, flags and versions (:func:`_build_key`). It
compiles a copy of the sources kept in its build directory, so a copy of the package elsewhere (``ray job submit
--working-dir`` unpacks one per job) finds the same build instead of recompiling: ninja rebuilds whenever a source
path changes, and before this every submitted job paid ~40 s, and left a rebuild to the next process that ran from
the original path. A finished build is imported directly, without ninja's check (~0.2 s in every fresh process).
``RAYREC_NATIVE=0`` turns the kernels off (the fallbacks run).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / f for f in ("dot_topk.cpp", "list_rank.cpp", "module.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {}


def native():
    """The built extension module, or ``None`` where it is off (``RAYREC_NATIVE=0``) or cannot be built (the
    reason is logged once, and kept in :func:`native_error`)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"], _state["error"] = _build()
    return _state["module"]


def native_error() -> str | None:
    """Why :func:`native` is ``None`` (after a call to it), else ``None``."""
    return _state.get("error")  # type: ignore[return-value]


_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers


def _build():
    if os.environ.get("RAYREC_NATIVE", "1") == "0":
        return None, "RAYREC_NATIVE=0"
    try:
        name = f"rayrec_native_{_cpu_tag()}_{_build_key()}"
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or _default_build_root()) / name
        so, done = build_dir / f"{name}.so", build_dir / "built.ok"
        if done.exists() and so.exists():  # built before, by this or another process (the marker comes last)
            return _import(name, so), None
        import shutil

        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the pip package's binary, when its venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        src = build_dir / "src"  # the copy that is compiled: one path, wherever this package lives
        src.mkdir(parents=True, exist_ok=True)
        for p in _SOURCES:
            dst = src / p.name
            if not dst.exists() or dst.read_bytes() != p.read_bytes():  # same bytes: keep its mtime (no rebuild)
                tmp = src / f".{p.name}.{os.getpid()}"
                tmp.write_bytes(p.read_bytes())
                os.replace(tmp, dst)  # atomic: a concurrent build reads the whole file or none
        module = cpp_extension.load(name=name, sources=[str(src / p.name) for p in _SOURCES],
                                    extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                                    verbose=False)
        tmp = build_dir / f".built.{os.getpid()}"
        tmp.write_text(f"{module.__file__}\n")
        os.replace(tmp, done)
        return module, None
    except Exception as e:  # no compiler, no ninja, a read-only cache: the fallback still serves
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.warning("rayrec: the native kernels could not be built (%s); using their PyTorch fallbacks", reason)
        return None, reason


def _default_build_root() -> str:
    from torch.utils import cpp_extension

    return cpp_extension.get_default_build_root()


def _import(name: str, path: Path):
    """The built extension at ``path``, imported as module ``name`` (what ``cpp_extension.load`` does after its
    build check)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_key() -> str:
    """A short hash of what the build depends on besides the CPU: the sources' bytes, the flags, torch's and
    Python's versions. A changed source gets a new build directory, never a stale module."""
    import hashlib
    import sys

    h = hashlib.sha1()
    for p in _SOURCES:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join([*_FLAGS, torch.__version__, sys.version]).encode())
    return h.hexdigest()[:10]


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags: the build is ``-march=native``, so a cache shared by
    machines with other CPUs (a home directory on a cluster) keeps one build per CPU kind instead of loading one
    with instructions this CPU lacks."""
    import hashlib
    import platform

    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    text += line
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def uses_native(queries: Tensor, keys_t: Tensor) -> bool:
    """Whether :func:`dot_topk` runs the fused kernel for these inputs."""
    return (queries.device.type == "cpu" and keys_t.device.type == "cpu" and queries.dtype == torch.float32
            and keys_t.dtype == torch.float32 and native() is not None)


def exclusion_csr(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> tuple[Tensor, Tensor]:
    """``(indptr [num_rows + 1], indices)`` of excluded ``(row, col)`` pairs as :func:`dot_topk` takes them: each
    row's columns sorted ascending, duplicates once."""
    key = torch.unique(rows.long() * num_cols + cols.long())  # sorted by row, then column
    indptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=key.device)
    indptr[1:] = torch.cumsum(torch.bincount(key // num_cols, minlength=num_rows), 0)
    return indptr, key % num_cols


@torch.library.custom_op("rayrec::dot_topk", mutates_args=())
def dot_topk(queries: Tensor, keys_t: Tensor, k: int, exclude_indptr: Tensor | None = None,
             exclude_indices: Tensor | None = None, pad: bool = False) -> tuple[Tensor, Tensor]:
    """Top ``k`` of ``queries @ keys_t`` per row, best first: ``(values [B, k], ids [B, k] int64)``.

    ``exclude_indptr`` ``[B + 1]`` / ``exclude_indices``: a CSR of item ids never returned for each row (each row's
    ids sorted ascending). ``pad``: a row with fewer than ``k`` admissible items ends in ``-inf`` / ``-1`` (else the
    kernel raises)."""
    if uses_native(queries, keys_t):
        return native().dot_topk(queries, keys_t, k, exclude_indptr, exclude_indices, pad)
    from rayrec.topk import sorted_topk

    scores = queries @ keys_t  # [B, I]
    if exclude_indptr is not None and exclude_indices is not None and exclude_indices.numel():
        counts = (exclude_indptr[1:] - exclude_indptr[:-1]).to(scores.device)
        rows = torch.repeat_interleave(torch.arange(scores.shape[0], device=scores.device), counts)
        scores[rows, exclude_indices.to(scores.device)] = -torch.inf
    v, i = sorted_topk(scores, k)  # [B, I] -> [B, k]
    i = torch.where(v == -torch.inf, torch.full_like(i, -1), i)
    if not pad and bool((i < 0).any()):
        raise RuntimeError("dot_topk: fewer than k finite scores for a row (non-finite embeddings?)")
    return v.contiguous(), i.contiguous()


@dot_topk.register_fake
def _(queries: Tensor, keys_t: Tensor, k: int, exclude_indptr: Tensor | None = None,
      exclude_indices: Tensor | None = None, pad: bool = False) -> tuple[Tensor, Tensor]:
    B = queries.shape[0]
    return queries.new_empty(B, k), queries.new_empty(B, k, dtype=torch.long)


def uses_native_lists(U: Tensor, V: Tensor) -> bool:
    """Whether :func:`rrd_nll` runs the fused kernel for these tables (CPU, float32, built)."""
    return (U.device.type == "cpu" and V.device.type == "cpu" and U.dtype == torch.float32
            and V.dtype == torch.float32 and native() is not None)


class _RRDNLL(torch.autograd.Function):
    """The fused kernel's RRD NLL: forward gives the per-row loss and keeps its gradient wrt the scores
    (``rrd_forward``); backward scatters ``g * dnll/ds`` into both tables (``list_dot_backward``)."""

    @staticmethod
    def forward(ctx, U: Tensor, V: Tensor, users: Tensor, items: Tensor, K: int) -> Tensor:
        nll, ds = native().rrd_forward(U, V, users, items, K)  # [B], [B, K + L]
        ctx.save_for_backward(U, V, users, items, ds)
        return nll

    @staticmethod
    def backward(ctx, g: Tensor):  # g [B]
        U, V, users, items, ds = ctx.saved_tensors
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gU, gV = native().list_dot_backward((ds * g.unsqueeze(1)).contiguous(), U, V, users, items, need_u, need_v)
        return (gU if need_u else None), (gV if need_v else None), None, None, None


def rrd_nll(U: Tensor, V: Tensor, users: Tensor, items: Tensor, K: int) -> Tensor:
    r"""RRD's relaxed ranking NLL per row (:func:`rayrec.distill.losses.relaxed_ranking_nll`) of the dot-product
    scores ``s[b, c] = U[users[b]] . V[items[b, c]]``: ``U`` ``[Nu, D]``, ``V`` ``[Ni, D]`` (embedding tables or any
    tensors, e.g. LightGCN's propagated ones), ``users`` ``[B]``, ``items`` ``[B, K + L]`` (the ``K`` interesting
    items in the teacher's order first) -> ``[B]``, differentiable wrt ``U`` and ``V``.

    On CPU (float32) it runs the fused kernel of ``rayrec/csrc/list_rank.cpp``: the same values up to float rounding
    (its dot products and sums run in another order; the loss in double), and a deterministic backward. Elsewhere,
    or without the kernel: gather, :func:`rayrec.models.base.batched_dot`, ``relaxed_ranking_nll``.
    """
    if uses_native_lists(U, V):
        return _RRDNLL.apply(U.contiguous(), V.contiguous(), users.contiguous().long(), items.contiguous().long(), K)
    from rayrec.distill.losses import relaxed_ranking_nll
    from rayrec.models.base import batched_dot

    scores = batched_dot(U[users], V[items])  # [B, K + L]
    return relaxed_ranking_nll(scores[:, :K], scores[:, K:])
