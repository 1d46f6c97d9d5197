"""Where Ray runs: a cluster (``RAY_ADDRESS`` or ``--ray-address``) or a local runtime.

Ray is an optional extra (``pip install 'medlens[ray]'``). It is imported only inside the
functions here, so ``import medlens`` and ``medlens --help`` never load it.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medlens.errors import ClusterError, ConfigError

CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an unreachable address for minutes


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray. ``address``: "auto" (``RAY_ADDRESS`` if set, else a local
    runtime), "local", or a cluster's ``host:port`` / ``ray://host:port``. ``workers``:
    actors, each holding the model once; ``gpus_per_worker`` > 0 runs them on CUDA."""

    address: str = "auto"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--ray-workers {self.workers}: use at least 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.batch_size < 1:
            raise ConfigError("Ray workers need > 0 CPUs, >= 0 GPUs and a batch size >= 1")

    @property
    def device(self) -> str | None:
        """The workers' torch device when they hold a GPU (else the settings' device)."""
        return "cuda" if self.gpus_per_worker > 0 else None


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # the [data] extra
    except ImportError as exc:
        raise ClusterError(
            f"Ray is not installed ({exc.name}): pip install 'medlens[ray]' (or run without --ray)"
        ) from None
    return ray


def resolve_address(address: str) -> str | None:
    """The cluster to connect to; None for a local runtime."""
    if address in ("", "local"):
        return None
    if address == "auto":
        return os.environ.get("RAY_ADDRESS") or None
    return address


def _probe(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"Ray address {address!r} is not host:port or ray://host:port "
            "(e.g. 10.0.0.5:6379 from `ray start --head`)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): is "
            "`ray start --head` running there, and is RAY_ADDRESS / --ray-address right?"
        ) from None


def preflight(options: RayOptions) -> None:
    """Before any work: Ray importable and the cluster (if one is named) listening."""
    ray = require_ray()
    address = resolve_address(options.address)
    if address is not None and not ray.is_initialized():
        _probe(address)


@contextlib.contextmanager
def ray_runtime(options: RayOptions) -> Iterator[Any]:
    """Ray, initialised for the length of a run. A runtime this process already has (a
    notebook, a test fixture) is used as it is and left running."""
    ray = require_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is shown
    if ray.is_initialized():
        yield ray
        return
    address = resolve_address(options.address)
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if address is None:
        # Logical CPUs for the actors plus one for the file reads, so they never starve.
        need = math.ceil(options.workers * options.cpus_per_worker) + 1
        kwargs["num_cpus"] = max(os.cpu_count() or 1, need)
    else:
        _probe(address)
        kwargs = {"address": address}
    try:
        ray.init(**kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise ClusterError(f"cannot start or join {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


READ_CPUS = 0.25  # file reads are I/O: they share a core rather than starve the actors


def actor_batches(
    ray: Any, paths: list[str], worker: type, kwargs: dict[str, Any], options: RayOptions
) -> Iterator[dict[str, Any]]:
    """Ray Data reads ``paths`` as bytes and a pool of ``options.workers`` ``worker``
    actors (built once each with ``kwargs``: the model loads once per worker) maps them
    in batches; yields each result batch (numpy columns) as it finishes. Ray retries a
    batch whose worker dies, so callers must write results idempotently."""
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=READ_CPUS)
    ds = ds.map_batches(
        worker,
        fn_constructor_kwargs=kwargs,
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
