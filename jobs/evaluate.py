"""Evaluate a trained model (student or small teacher) on its prepared data: the configured protocols on valid
and test, printed as a table and written as ``evaluation.json`` beside the checkpoint's run.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/evaluate.py --checkpoint <run's final checkpoint>
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint <run's final checkpoint>

The model, the prepared data and the evaluation settings come from the checkpoint's ``summary.json``; dotted
``eval.*`` overrides change the protocol (e.g. ``eval.full_ks=[10,20,50]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.config import EvalConfig, build, deep_merge, parse_override  # noqa: E402
from rayrec.errors import ConfigError  # noqa: E402
from rayrec.report import default_metric_keys, metrics_table  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a finished run's final checkpoint (with summary.json)")
    ap.add_argument("--out", default=None, help="where to write the metrics (default <checkpoint>/evaluation.json)")
    ap.add_argument("overrides", nargs="*", help="dotted eval.* overrides")
    args = ap.parse_args(argv)
    from rayrec.data.prepared import load_prepared
    from rayrec.eval.evaluate import EvalData, evaluate
    from rayrec.serve import _summary, load_dense_model

    s = _summary(Path(args.checkpoint))
    ev = s["config"]["eval"]
    for o in args.overrides:
        if not o.startswith("eval."):
            raise ConfigError(f"evaluate takes eval.* overrides only, got {o!r}")
        ev = deep_merge({"eval": ev}, parse_override(o))["eval"]
    ec = build(EvalConfig, ev, prefix="eval")
    model = load_dense_model(args.checkpoint)
    evald = EvalData.from_prepared(load_prepared(s["prepared"]))
    metrics = {}
    for split in ("valid", "test"):
        metrics.update(evaluate(model, evald, split, ec))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "evaluation.json"
    out.write_text(json.dumps(metrics, indent=1))
    name = f"{s['config']['model']['name']}_d{s['config']['model']['dim']}"
    print(metrics_table({name: metrics}, default_metric_keys(metrics)))
    print(f"\nmetrics: {out}")
    return metrics


if __name__ == "__main__":
    run_job(main)
