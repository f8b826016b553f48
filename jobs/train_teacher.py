"""Train a teacher whose embedding tables are sharded across the Ray Train workers (TorchRec, DMP).

    RAYREC_DATA=../shared/data .venv/bin/python jobs/train_teacher.py --config configs/experiments/citeulike__bpr_teacher.yaml
    ray job submit --working-dir . -- python jobs/train_teacher.py --config configs/experiments/citeulike__bpr_teacher.yaml

Dotted overrides follow the config files (e.g. ``ray.num_workers=4 model.sharding=table_wise``). Prints the final
checkpoint: DCP shards of the best epoch's tables (``model/``), loadable at any world size by ``rank_teacher`` and
the distillation workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.config import parse_cli  # noqa: E402
from rayrec.errors import ConfigError  # noqa: E402
from rayrec.report import default_metric_keys, metrics_table  # noqa: E402
from rayrec.train.fit import fit  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_cli(argv, description=__doc__, add_args=lambda ap: ap.add_argument(
        "--resume", action="store_true", help="continue the newest checkpoint of this run name under storage_root"))
    if cfg.model.sharding == "none":
        raise ConfigError("train_teacher needs model.sharding (row_wise, table_wise, column_wise or data_parallel); "
                          "add configs/teacher/sharded_row_wise.yaml to --config")
    summary = fit(cfg, resume=args.resume)
    m = summary["metrics"]
    print()
    print(f"Teacher at its best validation epoch ({summary['monitor']} = {summary['best_monitor']:.4f}, "
          f"epoch {summary['best_epoch']} of {summary['epochs_run']}):")
    print(metrics_table({f"{cfg.model.name}_d{cfg.model.dim} teacher ({cfg.model.sharding})": m},
                        default_metric_keys(m)))
    print(f"\nteacher checkpoint: {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    run_job(main)
