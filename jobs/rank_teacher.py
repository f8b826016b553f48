"""Rank with a trained sharded teacher: every user's top-N items (train items excluded) and, when configured,
each user's and item's k nearest neighbours, computed by the Ray Train workers without any of them holding the
full item table. Writes one parquet dataset directory with a manifest (see ``rayrec.teacher.rank``).

    RAYREC_DATA=../shared/data .venv/bin/python jobs/rank_teacher.py --config configs/experiments/citeulike__bpr_teacher.yaml --checkpoint <teacher checkpoint>
    ray job submit --working-dir . -- python jobs/rank_teacher.py --config configs/experiments/citeulike__bpr_teacher.yaml --checkpoint <teacher checkpoint>

``--checkpoint`` is the path ``train_teacher`` printed; ``cfg.model`` must describe that teacher. ``rank.*`` sets
N, the neighbour counts, metric and PCA; ``--out`` the output directory (default ``<storage_root>/rankings/<name>``).
``--resume`` keeps the ranking already there when it is complete and was made from the same checkpoint, prepared
data and ``rank.*`` config, and ranks again otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.config import parse_cli  # noqa: E402
from rayrec.teacher.rank import rank_teacher  # noqa: E402


def _args(ap) -> None:
    ap.add_argument("--checkpoint", required=True, help="the sharded teacher checkpoint (train_teacher's output)")
    ap.add_argument("--out", default=None, help="output directory (default <storage_root>/rankings/<name>)")
    ap.add_argument("--resume", action="store_true", help="keep a complete ranking already at the output directory "
                    "when it was made from the same checkpoint, data and rank config (else rank again)")


def main(argv: list[str] | None = None) -> Path:
    cfg, ns = parse_cli(argv, description=__doc__, add_args=_args)
    out = rank_teacher(cfg, ns.checkpoint, out=ns.out, resume=ns.resume)
    print(f"\nteacher ranking: {out}")
    return out


if __name__ == "__main__":
    run_job(main)
