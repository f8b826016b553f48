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

from rayrec.config import RayConfig
from rayrec.errors import ConfigError


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
            ray.init(
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
