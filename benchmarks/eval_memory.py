"""Full-ranking evaluation in bounded memory: 1M items x 100k users, chunked over users.

    .venv/bin/python benchmarks/eval_memory.py

A random BPR model (d=32) over 1,000,000 items; each user has 10 train items (masked) and 1 test item. The run
evaluates 10k users, then all 100k users, in the same process, and records the process's peak RSS after each:
with chunking the peak does not grow with the number of users (the [users x items] score block of one chunk is
bounded by ``eval.memory_budget_mb``). Writes ``benchmarks/results/eval_memory.json``.
``--smoke`` uses 20k items x 2k/4k users.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, command_line, commit, write_result  # noqa: E402
from rayrec.config import EvalConfig  # noqa: E402
from rayrec.eval.evaluate import CSR, EvalData, evaluate  # noqa: E402
from rayrec.models import BPR  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(num_users: int, num_items: int, evaluated: int, seed: int = 0) -> EvalData:
    rng = np.random.default_rng(seed)
    tu = np.repeat(np.arange(num_users), 10)
    ti = rng.integers(0, num_items // 2, size=len(tu))  # train items in the lower half, test in the upper
    su = np.arange(evaluated)  # only these users have a test item (the others are skipped)
    si = rng.integers(num_items // 2, num_items, size=evaluated)
    empty = np.zeros(0, dtype=np.int64)
    return EvalData(num_users, num_items, CSR.from_pairs(tu, ti, num_users), CSR.from_pairs(empty, empty, num_users),
                    CSR.from_pairs(su, si, num_users), None)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--budget-mb", type=int, default=256)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.items, args.users = 20_000, [2_000, 4_000]
    sha = commit()
    torch.manual_seed(0)
    total_users = max(args.users)
    model = BPR(total_users, args.items, 32, init_std=1.0)
    cfg = EvalConfig(sampled=False, full=True, full_ks=[20], memory_budget_mb=args.budget_mb)
    base = peak_rss_mib()
    rows = []
    for n in sorted(args.users):
        data = make_data(total_users, args.items, n)
        t0 = time.perf_counter()
        m = evaluate(model, data, "test", cfg)
        dt = time.perf_counter() - t0
        rows.append({
            "label": f"full_rank_{n // 1000}k_users_{args.items // 1000}k_items",
            "dataset": "synthetic", "model": "bpr", "method": "none", "dim": 32, "seeds": [0], "world_size": 1,
            "metrics": {k: round(v, 6) for k, v in m.items()},
            "timing": {"eval_s": round(dt, 2), "users_per_s": round(n / dt, 1)},
            "extra": {"users": n, "items": args.items, "memory_budget_mb": args.budget_mb,
                      "peak_mib": round(peak_rss_mib(), 1), "peak_before_eval_mib": round(base, 1),
                      "score_block_mib": round(args.items * 4 * max(1, args.budget_mb * 2**20 // (args.items * 16)) / 2**20, 1)},
        })
        print(f"{n:,} users x {args.items:,} items: {dt:.1f}s, peak RSS {peak_rss_mib():.0f} MiB", flush=True)
    if len(rows) > 1:
        rows[-1]["extra"]["peak_growth_ratio"] = round(rows[-1]["extra"]["peak_mib"] / rows[0]["extra"]["peak_mib"], 3)
    out = write_result("eval_memory", rows, command=command_line(__file__, argv), commit_sha=sha,
                       path=(RESULTS / "smoke" / "eval_memory.json") if args.smoke else None)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
