"""BPR alone on DE-RRD's CiteULike-t leave-one-out split, through Ray Train: d=200 (teacher size) and d=20.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/bpr_citeulike.py ray.num_workers=1

One Ray Train worker: on a 2-core machine a second worker brings no compute (each gets one core) while DDP
all-reduces the dense embedding gradients every step (d=200: 6M floats), measured 15 s vs 6 s per epoch.

Writes ``benchmarks/results/bpr_citeulike.json`` (rows ``bpr_d200``, ``bpr_d20``): sampled H/N/M@5/10/20 on
test (held-out item vs 499 fixed negatives, ties pessimistic) and full-ranking Recall/NDCG@20 (train and valid
items masked), at the epoch of best valid H@5. Targets from the DE-RRD paper (Table 2, same split):
d=200 H@5 >= 0.50 (paper 0.5135), d=20 H@5 >= 0.43 (paper 0.4441). ``--smoke`` runs 1 epoch on each size
and writes to ``benchmarks/results/smoke/`` (for tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, command_line, commit, write_result  # noqa: E402
from rayrec.config import CONFIG_DIR, load_config  # noqa: E402
from rayrec.report import metrics_table  # noqa: E402
from rayrec.train.fit import fit  # noqa: E402

PAPER_H5 = {200: 0.5135, 20: 0.4441}  # DE-RRD Table 2, CiteULike, BPR teacher / student
TARGET_H5 = {200: 0.50, 20: 0.43}
KEYS = ["test/H@5", "test/N@5", "test/M@5", "test/H@10", "test/N@10", "test/M@10", "test/H@20", "test/N@20",
        "test/M@20", "full/Recall@20", "full/NDCG@20", "full/HR@20"]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[200, 20])
    ap.add_argument("--smoke", action="store_true", help="1 epoch per size; result under results/smoke/")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. ray.num_workers=1")
    args = ap.parse_args(argv)
    sha = commit()  # the code that produces the numbers, captured before the (long) runs
    # --smoke's defaults first: a storage_root given on the command line (the tests' tmp dir) wins
    overrides = [*(["train.max_epochs=1", "storage_root=runs/smoke"] if args.smoke else []), *args.overrides]
    rows, table = [], {}
    for dim in args.dims:
        cfg = load_config([CONFIG_DIR / "benchmarks/bpr_citeulike.yaml", CONFIG_DIR / f"model/bpr_d{dim}.yaml"],
                          [f"name=bench_bpr_d{dim}", *overrides])
        s = fit(cfg)
        m = {k: s["metrics"][k] for k in KEYS if k in s["metrics"]}
        rows.append({
            "label": f"bpr_d{dim}",
            "dataset": "citeulike-t", "split": "derrd_loo_seed0", "model": "bpr", "method": "none", "dim": dim,
            "seeds": [cfg.train.seed], "world_size": s["world_size"],
            "metrics": m,
            "timing": {"epoch_s": round(s["timing"]["epoch_train_s"] + s["timing"]["epoch_eval_s"], 3),
                       "rows_per_s": round(s["timing"]["rows_per_s"], 1)},
            "extra": {
                "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"], "stopped_early": s["stopped_early"],
                "monitor": s["monitor"], "valid_best": s["best_monitor"], "num_parameters": s["num_parameters"],
                "paper_H@5": PAPER_H5.get(dim), "target_H@5": TARGET_H5.get(dim),
                "meets_target": (m.get("test/H@5", 0) >= TARGET_H5[dim]) if dim in TARGET_H5 else None,
                "valid_metrics": {k: v for k, v in s["metrics"].items() if k.startswith("valid/")},
            },
        })
        table[f"bpr_d{dim}"] = m
    out = write_result("bpr_citeulike", rows, command=command_line(__file__, argv),
                       path=(RESULTS / "smoke" / "bpr_citeulike.json") if args.smoke else None, commit_sha=sha)
    print(metrics_table(table, KEYS))
    print(f"\nwrote {out}")
    return out


if __name__ == "__main__":
    main()
