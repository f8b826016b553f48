"""Teacher ranking: top-500 for every user, as a share of this machine's dense matmul rate.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/ranking.py [--teacher-checkpoint <ckpt>]

``kernel``: the top-N step of ``jobs/rank_teacher.py`` (:func:`rayrec.sharding.ranking.sharded_topk`, chunks of
``rank.user_chunk`` users, train items excluded) for every user of CiteULike-t's DE-RRD split against a BPR d=200
item table in this process, on every core. Its scoring rate (2·U·I·D flop over the wall time of the whole step:
scores, exclusion, top-N, merge) divided by the fp32 matmul rate measured in the same run with the same threads
(an n x n GEMM, best of 5) is ``extra.matmul_ratio`` (target >= 0.5). The table holds N(0, 0.1) weights: the
step's cost depends on the shapes only. ``rank_teacher`` (with ``--teacher-checkpoint``): the whole job on 2 Ray
workers over the row-sharded checkpoint, its ``topn_s`` against the same matmul rate.
Writes ``benchmarks/results/ranking.json`` + ``.md``; ``--smoke``: 2k users x 5k items, top-100. ``--device cuda``:
the kernel and the matmul rate on the GPU (fp32, TF32 off; ``rank_teacher`` with ``ray.use_gpu=true``), written to
``ranking_cuda.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (add_device_arg, command_line, commit, device_of, result_path,  # noqa: E402
                               synchronize, write_table_result)


def matmul_rate(threads: int, n: int = 2048, reps: int = 5, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s of this machine in ``dtype`` (fp32 by default; ``device``; on CPU with ``threads``
    threads), best of ``reps``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        n = max(n, 8192)  # a GPU needs a larger GEMM to reach its rate
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate, as the scoring below runs in fp32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / best


def kernel(num_users: int, num_items: int, dim: int, top_n: int, chunk: int, indptr: np.ndarray,
           indices: np.ndarray, seed: int = 0, device: torch.device = torch.device("cpu")) -> dict:
    from rayrec.sharding.ranking import sharded_topk

    g = torch.Generator().manual_seed(seed)
    users = (torch.randn(num_users, dim, generator=g) * 0.1).to(device)
    items = (torch.randn(num_items, dim, generator=g) * 0.1).to(device)
    ip, ix = torch.from_numpy(indptr.astype(np.int64)).to(device), torch.from_numpy(indices.astype(np.int64)).to(device)
    ids = torch.arange(num_users, device=device)
    sharded_topk(users[:chunk], ids[:chunk], items, 0, top_n, ip, ix)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for a in range(0, num_users, chunk):
        b = min(a + chunk, num_users)
        s, i = sharded_topk(users[a:b], ids[a:b], items, 0, top_n, ip, ix)
    synchronize(device)
    took = time.perf_counter() - t0
    return {"topn_s": took, "flop": 2.0 * num_users * num_items * dim}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=200)
    ap.add_argument("--top-n", type=int, default=500)
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--user-chunks", type=int, nargs="+", default=None,
                    help="users per kernel step (default rank.user_chunk); several: one kernel row each")
    ap.add_argument("--smoke", action="store_true")
    add_device_arg(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the rank_teacher run, e.g. storage_root=/x")
    args = ap.parse_args(argv)
    device = device_of(args.device)
    sha = commit()
    from rayrec.config import CONFIG_DIR, load_config

    cfg = load_config([CONFIG_DIR / "data/citeulike_t_derrd.yaml"], [f"rank.top_n={args.top_n}"])
    chunk = cfg.rank.user_chunk
    if args.smoke:
        U, I, args.top_n = 2_000, 5_000, 100
        rng = np.random.default_rng(0)
        indptr = np.arange(0, 10 * U + 1, 10)
        indices = rng.integers(0, I, 10 * U)
        dataset = "synthetic"
    else:
        from rayrec.data.prepared import load_prepared, prepare
        from rayrec.train.fit import prepared_root

        pd = load_prepared(prepare(cfg.data, prepared_root(cfg), progress=lambda s: None))
        U, I, dataset = pd.num_users, pd.num_items, cfg.data.dataset
        from rayrec.eval.evaluate import EvalData

        train = EvalData.from_prepared(pd).train
        indptr, indices = train.indptr.numpy(), train.indices.numpy()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak = matmul_rate(threads, device=device)
    rows = []
    for n, c in enumerate(args.user_chunks or [chunk]):
        k = kernel(U, I, args.dim, args.top_n, c, indptr, indices, device=device)
        rate = k["flop"] / k["topn_s"]
        rows.append({"label": f"kernel_top{args.top_n}" + (f"_chunk{c}" if n else ""), "dataset": dataset,
                     "model": "bpr", "method": "teacher", "dim": args.dim, "world_size": 1, "device": args.device,
                     "timing": {"topn_s": round(k["topn_s"], 4), "users_per_s": round(U / k["topn_s"], 1)},
                     "extra": {"users": U, "items": I, "top_n": args.top_n, "user_chunk": c, "threads": threads,
                               "scoring_flop_per_s": round(rate), "matmul_flop_per_s": round(peak),
                               "matmul_ratio": round(rate / peak, 4), "target_matmul_ratio": 0.5}})
        print(f"[ranking] kernel: {U:,} users x {I:,} items x {args.dim}, {c} users per step: {k['topn_s']:.3f}s, "
              f"{rate / 1e9:.1f} GFLOP/s = {rate / peak:.2f} of matmul ({peak / 1e9:.1f} GFLOP/s)", flush=True)
    if args.teacher_checkpoint:
        import json

        from rayrec.teacher.rank import rank_teacher

        tcfg = load_config([CONFIG_DIR / "data/citeulike_t_derrd.yaml", CONFIG_DIR / "teacher/sharded_row_wise.yaml"],
                           ["name=bench_ranking", f"model.dim={args.dim}", f"rank.top_n={args.top_n}", "ray.num_workers=2",
                            *(["ray.use_gpu=true"] if args.device == "cuda" else []), *args.overrides])
        out = rank_teacher(tcfg, args.teacher_checkpoint)
        info = json.loads((Path(out) / "manifest.json").read_text())
        t = info.get("timings", {})
        rows.append({"label": f"rank_teacher_top{args.top_n}", "dataset": dataset, "model": "bpr",
                     "method": "teacher", "dim": args.dim, "world_size": 2, "device": args.device,
                     "timing": {k2: round(v, 4) for k2, v in t.items()},
                     "extra": {"matmul_ratio": round(k["flop"] / t["topn_s"] / peak, 4),
                               "checkpoint": args.teacher_checkpoint}})
    out_path = result_path("ranking", args.smoke, args.device)
    write_table_result(out_path.stem, rows, command_line(__file__, argv), out_path, sha,
                       ["row", "top-N s", "users/s", "share of matmul rate"],
                       lambda r: [r["label"], f"{r['timing']['topn_s']:.3f}",
                                  f"{r['timing'].get('users_per_s', U / r['timing']['topn_s']):,.0f}",
                                  f"{r['extra']['matmul_ratio']:.3f}"])
    return out_path


if __name__ == "__main__":
    main()
