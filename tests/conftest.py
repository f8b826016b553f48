"""Shared fixtures: data root, seeding, and one local Ray instance for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

# Tests, CI and the demo read the shared datasets through the data root; never copies in the repo.
os.environ.setdefault("RAYREC_DATA", str(SHARED_DATA))
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on loopback for a torch.distributed rendezvous (mp.spawn tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "citeulike-t" / "users.dat").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA} (tests need ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (start-up costs ~10 s). Stopped only by this fixture."""
    import ray

    from rayrec.config import RayConfig
    from rayrec.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(RayConfig(num_cpus=4, object_store_mb=512))
    yield ray
    if started:
        ray.shutdown()
