"""The main job: the whole pipeline on the default local Ray (or the cluster in RAY_ADDRESS), then where the
report is. Prepare the data, train the sharded teacher, rank it, distill the students, compare them.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/main.py --config configs/pipelines/citeulike_demo.yaml
    ray job submit --working-dir . -- python jobs/main.py --config configs/pipelines/citeulike_demo.yaml

Dotted overrides after the file go to every stage, e.g. ``train.max_epochs=2 storage_root=/tmp/rr``. ``--resume``
(same file, same overrides) keeps what an interrupted run finished and continues the stage it cut short from its
newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.pipeline import load_pipeline, run_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a pipeline file (configs/pipelines/*.yaml)")
    ap.add_argument("--resume", action="store_true", help="keep the stages an interrupted run of this pipeline "
                    "finished and continue the one it cut short from its newest checkpoint")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every stage (key=value)")
    args = ap.parse_args(argv)
    out = run_pipeline(load_pipeline(args.config, args.overrides), resume=args.resume)
    print(f"\nreport: {out / 'compare.md'} (chart: compare.png, artifacts: pipeline.json)")
    return out


if __name__ == "__main__":
    run_job(main)
