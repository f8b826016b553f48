"""Ray Tune search over distillation knobs: one full Ray Train distillation per trial, ASHA early stopping on
the per-epoch validation metric, then ``report.md``, ``results.csv``, plots and ``best.yaml`` (see rayrec.tune).

    RAYREC_DATA=../shared/data .venv/bin/python jobs/tune.py --config configs/tune/citeulike_de_rrd.yaml \
        distill.teacher.checkpoint=<ckpt> distill.teacher.ranking=<ranking>
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/citeulike_de_rrd.yaml distill.teacher.checkpoint=<ckpt> distill.teacher.ranking=<ranking>

Dotted overrides after the file go to every trial. ``--resume`` continues an interrupted search
(``Tuner.restore``) from ``<storage_root>/tune/<name>``. The search space is checked (keys, kinds, bounds,
values) before Ray starts; a bad one fails in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.tune import load_spec, run_tune  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a search file (configs/tune/*.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted search of the same name")
    ap.add_argument("--report-dir", default=None, help="write the report here (default <storage_root>/tune/<name>/report)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every trial (key=value)")
    args = ap.parse_args(argv)
    import shlex

    command = " ".join(["RAYREC_DATA=../shared/data .venv/bin/python jobs/tune.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    out = run_tune(load_spec(args.config, args.overrides), resume=args.resume, report_dir=args.report_dir,
                   command=command)
    print(f"\ntune report: {out / 'report.md'} (best config: {out / 'best.yaml'})")
    return out


if __name__ == "__main__":
    run_job(main)
