"""Entry-point plumbing shared by ``jobs/*.py``: rayrec's own errors become one clear line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from rayrec.errors import RayrecError


def run_job(main: Callable[[], object]) -> None:
    try:
        main()
    except RayrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
