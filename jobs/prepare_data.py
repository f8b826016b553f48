"""Prepare a dataset: read the raw files from the data root, filter, split, write parquet + a manifest.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/prepare_data.py --config configs/data/citeulike_t_derrd.yaml
    ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/data/citeulike_t_derrd.yaml

The prepared directory (``<storage_root>/prepared/<dataset>__<split>__<digest>``, or ``data.prepared_root``) is
named by a digest of the data config and the source checksums, so every later stage that uses the same data config
finds it and reuses it; preparing again is a no-op when nothing changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.config import parse_cli  # noqa: E402
from rayrec.data.prepared import load_prepared, prepare  # noqa: E402
from rayrec.train.fit import prepared_root  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_cli(argv, description=__doc__)
    out = prepare(cfg.data, prepared_root(cfg))
    pd = load_prepared(out)
    print(f"\nprepared data: {out} ({pd.num_users:,} users x {pd.num_items:,} items)")
    return out


if __name__ == "__main__":
    run_job(main)
