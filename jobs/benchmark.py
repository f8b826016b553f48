"""Run one of the benchmark scripts (``benchmarks/<name>.py``) as a job; its result lands in
``benchmarks/results/<name>.json`` (+ ``.md``) in the format of ``../shared/docs/results.md``.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/benchmark.py sharded_teacher --smoke
    ray job submit --working-dir . -- python jobs/benchmark.py derrd_citeulike --models bpr --methods none --seeds 0

Everything after the name goes to the script (``jobs/benchmark.py <name> --help`` shows its options). Note that
under ``ray job submit`` the result is written in the job's working directory on the head node: copy it back.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.errors import ConfigError  # noqa: E402

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if p.stem not in ("__init__", "common"))


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nbenchmarks: " + ", ".join(BENCHMARKS))
        return None
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"benchmarks.{name}").main(rest)


if __name__ == "__main__":
    run_job(main)
