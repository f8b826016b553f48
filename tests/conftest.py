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
os.environ["RAYREC_DATA"] = str(Path(os.environ["RAYREC_DATA"]).resolve())  # tests may chdir
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # small runs: see workers start/finish sooner


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def native_kernels():
    """rayrec's built native kernel module (``rayrec.kernels.native()``). Fails where a C++ compiler is present but
    the build failed; skips only on a machine without one (the ops' fallbacks are tested there)."""
    import shutil

    from rayrec import kernels

    if kernels.native() is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is here but the kernel did not build: {kernels.native_error()}")
        pytest.skip(f"no C++ compiler: {kernels.native_error()}")
    return kernels.native()


@pytest.fixture
def free_port() -> int:
    """A free TCP port on loopback for a torch.distributed rendezvous (mp.spawn tests)."""
    return _port()


@pytest.fixture
def spawn():
    """``spawn(fn, args_for_port, nprocs)``: ``mp.spawn`` of a gloo test on a fresh rendezvous port.

    A child killed by a signal (gloo aborts the process when a peer connection is torn down under heavy load)
    is retried once on a new port, with a warning; exceptions and failed assertions in a child are never
    retried."""
    import warnings

    import torch.multiprocessing as mp

    def run(fn, args_for_port, nprocs: int = 2) -> None:
        for attempt in (1, 2):
            try:
                mp.spawn(fn, args=tuple(args_for_port(_port())), nprocs=nprocs, join=True)
                return
            except mp.ProcessExitedException as e:
                if e.signal_name is None or attempt == 2:
                    raise
                warnings.warn(f"spawned rank {e.error_index} died with {e.signal_name}; retrying once")

    return run


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
