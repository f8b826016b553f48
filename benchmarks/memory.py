"""Sharded teacher memory: per-worker peak memory at world size 1 and 2, in one run.

    .venv/bin/python benchmarks/memory.py

A BPR teacher of ``--users`` + ``--items`` rows x ``--dim`` (default 10M + 10M x 64: 4.8 GiB of weights plus the
row-wise Adagrad state) built as TorchRec tables sharded row-wise over 1, then 2 gloo processes (the same
``rayrec.sharding.shard_model`` the Ray Train workers use), each running ``--steps`` training steps of 4096
interactions with the fused optimizer. Per worker: peak RSS (``timing.peak_mib``), RSS before the tables were
built (``extra.base_mib``: the Python runtime), and the table share predicted by ``rayrec.sharding.memory``.
``extra.peak_ws2_vs_ws1_ratio`` = peak per worker at world size 2 / at 1 (target <= 0.6; 0.5 + the runtime's
share). Writes ``benchmarks/results/memory.json`` + ``.md``; ``--smoke``: 1M + 1M x 64 into ``results/smoke/``.
``--device cuda`` (2 GPUs): nccl, one GPU per rank, and the peaks are each GPU's peak allocated memory (the runtime
column is the memory allocated before the tables were built), into ``memory_cuda.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, command_line, commit, device_of, result_path, write_table_result  # noqa: E402,E501
from benchmarks.sharded_teacher import measure_memory  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device_of(args.device)
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit("error: --device cuda measures world size 1 and 2 with one GPU per rank: needs 2 GPUs, "
                             f"this machine has {torch.cuda.device_count()}")
    if args.smoke:
        args.users, args.items, args.steps = 1_000_000, 1_000_000, 3
    sha = commit()
    rows, mem = [], {}
    for world in (1, 2):
        print(f"[memory] {args.users:,} + {args.items:,} rows x {args.dim}, {world} worker(s)", flush=True)
        m = mem[world] = measure_memory(world, args.users, args.items, args.dim, args.steps, args.device)
        rows.append({
            "label": f"teacher_ws{world}", "model": "bpr", "method": "teacher", "dim": args.dim, "world_size": world,
            "device": args.device,
            "timing": {"peak_mib": round(m["peak_mib"], 1),
                       "step_s": round(max(r["step_s"] for r in m["ranks"]), 4),
                       "build_s": round(max(r["build_s"] for r in m["ranks"]), 2)},
            "extra": {"users": args.users, "items": args.items, "base_mib": round(m["base_mib"], 1),
                      "tables_estimate_mib": round(m["estimate_mib"], 1), "per_rank": m["ranks"]},
        })
    ratio = mem[2]["peak_mib"] / mem[1]["peak_mib"]
    above = (mem[2]["peak_mib"] - mem[2]["base_mib"]) / (mem[1]["peak_mib"] - mem[1]["base_mib"])
    for r in rows:
        r["extra"]["peak_ws2_vs_ws1_ratio"] = round(ratio, 4)
        r["extra"]["above_base_ws2_vs_ws1_ratio"] = round(above, 4)
    out_path = result_path("memory", args.smoke, args.device)
    write_table_result(out_path.stem, rows, command_line(__file__, argv), out_path, sha,
                       ["world size", "peak MiB per worker", "runtime MiB", "tables (estimate) MiB", "step s"],
                       lambda r: [str(r["world_size"]), f"{r['timing']['peak_mib']:,.0f}", f"{r['extra']['base_mib']:,.0f}",
                                  f"{r['extra']['tables_estimate_mib']:,.0f}", f"{r['timing']['step_s']:.3f}"],
                       f"Peak per worker at world size 2 / 1: **{ratio:.3f}** (above the runtime: {above:.3f}).")
    return out_path


if __name__ == "__main__":
    main()
