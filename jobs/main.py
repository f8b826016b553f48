"""The main job: prepare CiteULike-t, train a BPR student alone through Ray Train, evaluate, print the table.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/main.py --config configs/experiments/citeulike__bpr_demo.yaml
    ray job submit --working-dir . -- python jobs/main.py --config configs/experiments/citeulike__bpr_demo.yaml

Dotted overrides follow the config files, e.g. ``train.max_epochs=3 ray.num_workers=1``.
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
    cfg, _ = parse_cli(argv, description=__doc__)
    summary = fit(cfg)
    label = f"{cfg.model.name}_d{cfg.model.dim} (student alone)"
    m = summary["metrics"]
    print()
    print(f"Test metrics at the best validation epoch ({summary['monitor']} = {summary['best_monitor']:.4f}, "
          f"epoch {summary['best_epoch']} of {summary['epochs_run']}):")
    print(metrics_table({label: m}, default_metric_keys(m)))
    print(f"\nrun directory: {summary['run_dir']}")
    return summary


if __name__ == "__main__":
    run_job(main)
