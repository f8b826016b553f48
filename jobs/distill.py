"""Distill a trained (sharded) teacher into a small student through Ray Train.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/distill.py --config configs/experiments/citeulike__bpr_d200_to_d20__de_rrd.yaml distill.teacher.checkpoint=<ckpt> distill.teacher.ranking=<ranking>
    ray job submit --working-dir . -- python jobs/distill.py --config configs/experiments/citeulike__bpr_d200_to_d20__de_rrd.yaml distill.teacher.checkpoint=<ckpt> distill.teacher.ranking=<ranking>

``distill.method`` picks the method (none, rd, cd, de, rrd, de_rrd); ``distill.teacher.checkpoint`` is
``train_teacher``'s output (DE), ``distill.teacher.ranking`` ``rank_teacher``'s (RD, CD, RRD). Every worker holds
the frozen teacher sharded and a DDP replica of the student; the loss terms are logged per epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.config import parse_cli  # noqa: E402
from rayrec.report import default_metric_keys, metrics_table  # noqa: E402
from rayrec.train.fit import fit  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_cli(argv, description=__doc__, add_args=lambda ap: ap.add_argument(
        "--resume", action="store_true", help="continue the newest checkpoint of this run name under storage_root"))
    summary = fit(cfg, resume=args.resume)
    m = summary["metrics"]
    print()
    print(f"Student at its best validation epoch ({summary['monitor']} = {summary['best_monitor']:.4f}, "
          f"epoch {summary['best_epoch']} of {summary['epochs_run']}; {summary['num_parameters']:,} parameters):")
    print(metrics_table({f"{cfg.model.name}_d{cfg.model.dim} {cfg.distill.method}": m}, default_metric_keys(m)))
    print(f"\nrun directory: {summary['run_dir']}")
    return summary


if __name__ == "__main__":
    run_job(main)
