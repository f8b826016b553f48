"""Fixtures of the data tests: the shared data root (read-only, never copied) and small-file helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[2].parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """``<repo>/../shared/data``; the data tests fail (not skip) without it."""
    if not (SHARED_DATA / "citeulike-t" / "users.dat").is_file():
        pytest.fail(f"shared data not found at {SHARED_DATA} (the data tests read ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def data_root(shared_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$RAYREC_DATA pointed at the shared data root for this test."""
    monkeypatch.setenv("RAYREC_DATA", str(shared_root))
    return shared_root


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(name, text_or_bytes)`` -> a file under tmp_path (parents created)."""

    def _write(name: str, content: str | bytes) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p

    return _write
