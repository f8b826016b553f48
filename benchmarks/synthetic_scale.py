"""Synthetic data at scale: generate 10M interactions streamed to parquet, then prepare them (LOO by time).

    .venv/bin/python benchmarks/synthetic_scale.py

Each stage runs in a child process so its peak RSS is its own. Writes ``benchmarks/results/synthetic_scale.json``.
``--smoke`` uses 200k interactions.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, command_line, commit, write_result  # noqa: E402


def _generate(out, users, items, n, q):
    from rayrec.data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    m = generate_synthetic(out, num_users=users, num_items=items, num_interactions=n, seed=0)
    q.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, m))


def _prepare(src, root, q):
    from rayrec.config import DataConfig
    from rayrec.data.prepared import load_prepared, prepare

    t0 = time.perf_counter()
    cfg = DataConfig(dataset="files", root=str(Path(src).parent), files=[Path(src).name], reader="parquet",
                     split="loo", order="time", num_eval_negatives=499)
    p = prepare(cfg, root, progress=lambda s: print(s, flush=True))
    counts = load_prepared(p).manifest["counts"]
    q.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, counts))


def _run(target, *args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    if p.exitcode:
        raise SystemExit(f"{target.__name__} failed with exit code {p.exitcode}")
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.interactions, args.users, args.items = 200_000, 5_000, 2_000
    sha = commit()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "synthetic"
        gen_s, gen_peak, manifest = _run(_generate, str(src), args.users, args.items, args.interactions)
        size_mb = sum(f.stat().st_size for f in src.glob("*.parquet")) / 2**20
        prep_s, prep_peak, counts = _run(_prepare, str(src), str(Path(tmp) / "prepared"))
    row = {
        "label": f"synthetic_{args.interactions // 1_000_000 or args.interactions / 1e6}m",
        "dataset": "synthetic", "model": None, "method": None, "seeds": [0], "world_size": 1,
        "metrics": {},
        "timing": {"generate_s": round(gen_s, 1), "prepare_s": round(prep_s, 1),
                   "generate_rows_per_s": round(args.interactions / gen_s, 1)},
        "extra": {"users": args.users, "items": args.items, "interactions": args.interactions,
                  "generate_peak_mib": round(gen_peak, 1), "prepare_peak_mib": round(prep_peak, 1),
                  "parquet_mib": round(size_mb, 1), "parts": manifest.get("counts", {}).get("parts", None),
                  "in_cluster_share": manifest.get("in_cluster_share"), "prepared_counts": counts},
    }
    out = write_result("synthetic_scale", [row], command=command_line(__file__, argv), commit_sha=sha,
                       path=(RESULTS / "smoke" / "synthetic_scale.json") if args.smoke else None)
    print(f"generate {gen_s:.1f}s (peak {gen_peak:.0f} MiB), prepare {prep_s:.1f}s (peak {prep_peak:.0f} MiB) -> {out}")
    return out


if __name__ == "__main__":
    main()
