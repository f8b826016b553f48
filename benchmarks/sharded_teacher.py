"""The sharded teacher: quality, training speed, per-worker memory and ranking speed, in one run.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/sharded_teacher.py

Rows of ``benchmarks/results/sharded_teacher.json``:

- ``bpr_teacher``: BPR d=200 on DE-RRD's CiteULike-t split trained through the sharded path (TorchRec row-wise
  tables, fused row-wise Adagrad, 2 Ray Train workers): sampled test H/N/M@K at the best valid H@5 epoch and full
  Recall/NDCG@20. Target H@5 >= 0.50 (DE-RRD Table 2 teacher: 0.5135).
- ``train_sharded``: rows/s of that sharded training vs the unsharded foundation path (dense tables, DDP, Adam;
  same data, batch and workers) over ``--dense-epochs`` epochs: ``extra.sharded_vs_dense_ratio``.
- ``rank_top500``: top-500 (train items excluded) for every user with ``rayrec.teacher.rank_teacher`` on 2
  workers; its scoring rate (2·U·I·D flop / wall time of the top-N step) vs this machine's dense fp32 matmul
  rate measured in the same run with the same threads: ``extra.matmul_ratio``.
- ``memory_ws1`` / ``memory_ws2``: a synthetic BPR teacher of ``--mem-users`` + ``--mem-items`` rows x
  ``--mem-dim`` (default 10M + 10M x 64: 4.8 GiB of weights) sharded row-wise over 1 and 2 gloo processes, each
  running ``--mem-steps`` training steps with the fused optimizer: peak RSS per worker (``timing.peak_mib``), the
  RSS before the tables were built, and the table share estimated by ``rayrec.sharding.memory``.

``--smoke`` runs everything small (ML-100K, 1 epoch, 2M-row tables) into ``benchmarks/results/smoke/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import RESULTS, command_line, commit, write_result  # noqa: E402
from benchmarks.ranking import matmul_rate  # noqa: E402
from rayrec.config import CONFIG_DIR, load_config  # noqa: E402

KEYS = ["test/H@5", "test/N@5", "test/M@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20",
        "full/Recall@20", "full/NDCG@20", "full/HR@20"]
TEACHER = [
    "model.sharding=row_wise", "model.fused_optimizer=exact_rowwise_adagrad",
    "train.lr=0.1", "train.weight_decay=0.01", "ray.num_workers=2",
]


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _mem_worker(rank: int, world: int, port: int, users: int, items: int, dim: int, steps: int, out: str,
                device: str = "cpu") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    gpu_mib = lambda: torch.cuda.memory_allocated(dev) / 2**20  # noqa: E731
    from rayrec.models.sharded import ShardedBPR
    from rayrec.sharding import shard_model
    from rayrec.train.task import TrainTask

    base = gpu_mib() if dev.type == "cuda" else _rss_mib()
    t0 = time.perf_counter()
    dmp = shard_model(TrainTask(ShardedBPR(users, items, dim), world_size=world), optimizer="exact_rowwise_adagrad",
                      lr=0.05, device=dev)
    build_s = time.perf_counter() - t0
    after_build = gpu_mib() if dev.type == "cuda" else _rss_mib()
    g = torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    for _ in range(steps):
        u = torch.randint(0, users, (4096,), generator=g)
        p = torch.randint(0, items, (4096,), generator=g)
        n = torch.randint(0, items, (4096, 1), generator=g)
        loss, _ = dmp(u.to(dev), p.to(dev), n.to(dev))
        loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    # VmHWM: this process image's high-water mark (ru_maxrss would keep the forking parent's RSS across exec); on a
    # GPU the device's peak allocated memory
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _status_mib("VmHWM")
    Path(f"{out}.{rank}").write_text(json.dumps({"base_mib": base, "after_build_mib": after_build, "peak_mib": peak,
                                                 "build_s": build_s, "step_s": step_s}))
    dist.barrier()
    dist.destroy_process_group()


def measure_memory(world: int, users: int, items: int, dim: int, steps: int, device: str = "cpu") -> dict:
    """Per-rank memory of a row-wise sharded BPR teacher over ``world`` processes (host RSS, or on ``cuda`` the
    GPU's peak allocated memory, one GPU per rank)."""
    import socket

    import torch.multiprocessing as mp

    from rayrec.sharding.memory import model_tables, table_bytes_per_worker

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "mem")
        for attempt in range(3):  # the free port found here can be taken before rank 0 listens on it: retry
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            try:
                mp.spawn(_mem_worker, args=(world, port, users, items, dim, steps, out, device), nprocs=world,
                         join=True)
                break
            except mp.ProcessRaisedException as e:
                if "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
                print(f"[memory] port {port} was taken before the workers bound it; retrying", flush=True)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    est = table_bytes_per_worker(model_tables("bpr", users, items, dim), "row_wise", "exact_rowwise_adagrad", world)
    return {"ranks": ranks, "peak_mib": max(r["peak_mib"] for r in ranks),
            "base_mib": max(r["base_mib"] for r in ranks), "estimate_mib": est / 2**20}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny everything; result under results/smoke/")
    ap.add_argument("--mem-users", type=int, default=10_000_000)
    ap.add_argument("--mem-items", type=int, default=10_000_000)
    ap.add_argument("--mem-dim", type=int, default=64)
    ap.add_argument("--mem-steps", type=int, default=20)
    ap.add_argument("--dense-epochs", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for the teacher run")
    args = ap.parse_args(argv)
    sha = commit()
    from rayrec.teacher.rank import load_ranking, rank_teacher
    from rayrec.train.fit import fit

    files = [CONFIG_DIR / "benchmarks/bpr_citeulike.yaml", CONFIG_DIR / "model/bpr_d200.yaml"]
    extra = ["name=bench_sharded_teacher", *TEACHER]
    if args.smoke:
        files = [CONFIG_DIR / "data/ml100k.yaml", CONFIG_DIR / "model/bpr_d20.yaml"]
        extra += ["name=smoke_sharded_teacher", "train.max_epochs=1", "storage_root=runs/smoke",
                  "data.num_eval_negatives=99"]
        args.mem_users, args.mem_items, args.mem_steps, args.dense_epochs = 1_000_000, 1_000_000, 2, 1
    rows = []

    # [1] memory at world size 1 and 2 (first: nothing else of this script is resident yet)
    mem = {}
    for world in (1, 2):
        print(f"[bench] memory: {args.mem_users:,} + {args.mem_items:,} rows x {args.mem_dim}, {world} worker(s)",
              flush=True)
        mem[world] = measure_memory(world, args.mem_users, args.mem_items, args.mem_dim, args.mem_steps)
        print(f"[bench]   peak {mem[world]['peak_mib']:,.0f} MiB per worker (before tables "
              f"{mem[world]['base_mib']:,.0f} MiB, estimate {mem[world]['estimate_mib']:,.0f} MiB)", flush=True)
    for world in (1, 2):
        m = mem[world]
        rows.append({
            "label": f"memory_ws{world}", "model": "bpr", "method": "teacher", "dim": args.mem_dim,
            "dataset": "synthetic", "world_size": world,
            "timing": {"peak_mib": round(m["peak_mib"], 1), "step_s": round(max(r["step_s"] for r in m["ranks"]), 4),
                       "build_s": round(max(r["build_s"] for r in m["ranks"]), 2)},
            "extra": {"users": args.mem_users, "items": args.mem_items, "base_mib": round(m["base_mib"], 1),
                      "tables_estimate_mib": round(m["estimate_mib"], 1),
                      "peak_ws_ratio": round(m["peak_mib"] / mem[1]["peak_mib"], 3),
                      "peak_above_base_ws_ratio": round((m["peak_mib"] - m["base_mib"])
                                                        / (mem[1]["peak_mib"] - mem[1]["base_mib"]), 3),
                      "per_rank": m["ranks"]},
        })

    # [2] the teacher through the sharded path, 2 workers
    cfg = load_config(files, [*extra, *args.overrides])
    s = fit(cfg)
    m = {k: s["metrics"][k] for k in KEYS if k in s["metrics"]}
    rows.append({
        "label": "bpr_teacher", "dataset": cfg.data.dataset, "split": cfg.data.split, "model": "bpr",
        "method": "teacher", "dim": cfg.model.dim, "seeds": [cfg.train.seed], "world_size": s["world_size"],
        "metrics": m,
        "timing": {"epoch_s": round(s["timing"]["epoch_train_s"] + s["timing"]["epoch_eval_s"], 3),
                   "rows_per_s": round(s["timing"]["rows_per_s"], 1)},
        "extra": {"sharding": cfg.model.sharding, "fused_optimizer": cfg.model.fused_optimizer, "lr": cfg.train.lr,
                  "weight_decay": cfg.train.weight_decay, "best_epoch": s["best_epoch"],
                  "epochs_run": s["epochs_run"], "valid_best": s["best_monitor"], "target_H@5": 0.50,
                  "paper_H@5": 0.5135, "meets_target": m.get("test/H@5", 0) >= 0.50,
                  "checkpoint": s["checkpoint"]},
    })

    # [3] rows/s: the same data through the unsharded foundation path (dense tables + DDP + Adam)
    dense_cfg = load_config(files, [*extra, *args.overrides, "model.sharding=none", "train.lr=0.001",
                                    "train.weight_decay=0.001", f"train.max_epochs={args.dense_epochs}",
                                    "eval.full=false", "name=bench_dense_path"])
    d = fit(dense_cfg)
    sharded_hist = s["history"][: max(args.dense_epochs, 1)]
    sharded_rps = sum(h["train/rows_per_s"] for h in sharded_hist) / len(sharded_hist)
    dense_rps = d["timing"]["rows_per_s"]
    rows.append({
        "label": "train_sharded", "dataset": cfg.data.dataset, "model": "bpr", "method": "teacher",
        "dim": cfg.model.dim, "world_size": s["world_size"],
        "timing": {"rows_per_s": round(sharded_rps, 1)},
        "extra": {"dense_rows_per_s": round(dense_rps, 1), "sharded_vs_dense_ratio": round(sharded_rps / dense_rps, 3),
                  "epochs_compared": len(sharded_hist)},
    })

    # [4] top-500 for every user, 2 workers, vs the machine's matmul rate
    rank_cfg = load_config(files, [*extra, *args.overrides, "rank.top_n=500"])
    out = rank_teacher(rank_cfg, s["checkpoint"], prepared=Path(s["prepared"]))
    rk = load_ranking(out)
    t = rk.manifest["timings"]
    U, I, D = rk.manifest["num_users"], rk.manifest["num_items"], cfg.model.dim
    rate = 2 * U * I * D / t["topn_s"]
    peak = matmul_rate(threads=os.cpu_count() or 1)
    rows.append({
        "label": "rank_top500", "dataset": cfg.data.dataset, "model": "bpr", "method": "teacher", "dim": D,
        "world_size": rk.manifest["world_size"],
        "timing": {"topn_s": round(t["topn_s"], 3), "total_s": round(t["total_s"], 2),
                   "users_per_s": round(U / t["topn_s"], 1)},
        "extra": {"users": U, "items": I, "top_n": rk.manifest["top_n"], "scoring_flop_per_s": round(rate),
                  "matmul_flop_per_s": round(peak), "matmul_ratio": float(f"{rate / peak:.3g}")},
    })

    path = write_result("sharded_teacher", rows, command=command_line(__file__, argv),
                        path=(RESULTS / "smoke" / "sharded_teacher.json") if args.smoke else None, commit_sha=sha)
    for r in rows:
        print(r["label"], json.dumps({k: r[k] for k in ("metrics", "timing") if k in r}))
        print("   ", json.dumps({k: v for k, v in r["extra"].items() if k != "per_rank"}))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
