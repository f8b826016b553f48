"""Starting or joining Ray, sized so Ray Train workers and Ray Data never starve each other.

On a small machine (2 cores) ``TorchTrainer(num_workers=2)`` claiming 1 CPU each plus a Ray Data task deadlocks
when Ray has only 2 logical CPUs: the data task never gets a CPU. A local Ray started here therefore gets
``max(4, 2 * cores)`` logical CPUs (oversubscription of logical CPUs, not of threads: each worker runs
``cores // workers`` torch threads), and :func:`check_resources` refuses a layout that leaves Ray Data no CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rayrec.config import RayConfig
from rayrec.errors import ConfigError


_STARTED_LOCALLY = False  # init_ray started the cluster this process uses


def local_num_cpus(rc: RayConfig) -> int:
    return rc.num_cpus if rc.num_cpus is not None else max(4, 2 * (os.cpu_count() or 1))


def check_resources(rc: RayConfig, num_cpus: float) -> None:
    need = max(rc.num_workers, 1) * rc.cpus_per_worker
    if need > num_cpus - 1:
        raise ConfigError(
            f"ray: {rc.num_workers} workers x {rc.cpus_per_worker} CPU = {need:g} of {num_cpus:g} logical CPUs leaves "
            f"Ray Data less than 1 CPU and would deadlock; lower ray.cpus_per_worker or raise ray.num_cpus"
        )


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail in one line, within seconds, when nothing listens at a ``host:port`` cluster address (``ray.init``
    itself retries for minutes). ``auto`` and addresses without a port are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"ray: no cluster answers at {address!r} ({e.strerror or type(e).__name__}); start one "
                          f"with `ray start --head` or fix ray.address / RAY_ADDRESS") from None


@contextmanager
def _own_address() -> Iterator[None]:
    """While a local Ray starts: ``RAY_GCS_SERVER_PORT`` = a free port and ``RAY_ADDRESS`` = this node's address
    with it, so the new instance's processes (raylet, every worker and actor) inherit their own cluster's address.
    Without it, code inside the cluster that looks the cluster up (Ray Train's ``PlacementGroupCleaner`` uses the
    State API) fails with "Found multiple active Ray instances" when another Ray runs on the machine, and the
    placement group of a run that was killed (a Tune trial stopped by ASHA) is never removed: its CPUs stay
    reserved and the next trial's workers never start. The driver's environment is restored afterwards."""
    import socket

    from ray._private.services import get_node_ip_address

    with socket.socket() as sock:  # a port free now (the GCS binds it moments later)
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    old = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(rc: RayConfig) -> dict:
    """Connect to ``rc.address`` / ``$RAY_ADDRESS`` if given, else start a local Ray. Returns cluster resources."""
    import ray

    if not ray.is_initialized():
        address = rc.address or os.environ.get("RAY_ADDRESS")
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, **quiet)
            except Exception as e:  # noqa: BLE001 - report the cause in one line
                raise ConfigError(f"ray: cannot connect to cluster at {address!r}: {type(e).__name__}: {e}") from None
        else:
            ncpu = local_num_cpus(rc)
            check_resources(rc, ncpu)
            # print() in Train workers goes straight to the driver (Ray's print patch would log every line twice).
            # Set here, the local cluster's workers inherit it, so Train workers need no runtime_env of their own
            # and start from Ray's pool of idle worker processes (see worker_runtime_env)
            os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
            # Ray Train's controller polls its workers every 2 s by default: each run then waits up to 2 s to see
            # its workers start and again to see them finish (~4.5 s of a 20 s small run measured here)
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
            global _STARTED_LOCALLY
            _STARTED_LOCALLY = True
            with _own_address():
                ray.init(
                    address="local",  # a new instance even though RAY_ADDRESS names it (see _own_address)
                    num_cpus=ncpu,
                    object_store_memory=rc.object_store_mb * 1024 * 1024,
                    include_dashboard=True,  # the State API (used by Ray Train's clean-up) lives in the dashboard
                    dashboard_host="127.0.0.1",
                    **quiet,
                )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    quiet_ray_loggers()
    res = ray.cluster_resources()
    check_resources(rc, float(res.get("CPU", 0)))
    return res


def quiet_ray_loggers() -> None:
    """Keep Ray Train/Data and TorchRec/FBGEMM INFO chatter (every report, every checkpoint, every kernel library
    loaded) out of the user's progress lines. Warnings and errors still show."""
    import warnings

    for name in ("ray.train", "ray.data", "ray.tune", "torchrec", "fbgemm_gpu", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.WARNING)
    # TorchRec 1.8 state dicts are ShardedTensors; torch warns on every access that they will become DTensors
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message="is_fx_tracing will return true")
    try:  # Ray 2.60 names this logger by file path, outside "ray.train", so LoggingConfig does not reach it
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - other Ray versions
        pass


def worker_runtime_env() -> dict | None:
    """The runtime_env of Ray Train workers: none on a local cluster started by :func:`init_ray` (its workers
    inherit ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``, and a runtime_env would force fresh worker processes instead of
    Ray's idle ones); on a joined cluster, whose workers inherit from their raylet, the env var per worker."""
    return None if _STARTED_LOCALLY else {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
