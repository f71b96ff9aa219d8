"""Dask clusters for slidepipe: a LocalCluster sized to the machine by default, or an existing
cluster (``tcp://HOST:PORT``, dask-jobqueue, Kubernetes) when the user names its scheduler.

The same graph runs on either. Model workers are declared by the worker resource ``MODEL`` (one
per worker process, so one process per GPU holds one model); tasks that run a backbone ask for
one unit of it, so on an existing cluster only workers started with ``--resources MODEL=1``
(and a GPU, where there is one) receive them.

LocalCluster workers are started for CPU inference (ADR 0004): glibc gets one malloc arena
(``MALLOC_ARENA_MAX=1``, read only at process start), because a Dask task runs in a worker
thread and thread arenas cannot keep a batch's 100 MB activations, which are then mapped and
page-faulted afresh on every forward pass (half the speed of the same code in a main thread);
and Dask's statistical profiler (a 10 ms stack sampler that holds the GIL and competes with
torch's threads) is off unless ``profile: true``. Workers of an existing cluster should be
started with the same environment variable (see the README).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MODEL_RESOURCE = "MODEL"


class ClusterConfig(BaseModel):
    """Where the graph runs (the ``cluster:`` section)."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = Field(
        None, description="address of an existing Dask scheduler (tcp://HOST:PORT); "
        "None starts a LocalCluster")
    workers: int | None = Field(
        None, ge=1, description="LocalCluster worker processes (default: one per GPU, else 1)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker (default: the cores per worker)")
    dashboard: str | None = Field(":0", description="dashboard address; None disables it")
    profile: bool = Field(
        False, description="Dask's statistical profiler in LocalCluster workers (slows CPU "
        "inference by sampling stacks every 10 ms)")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install must not stop CPU runs
        return 0


def default_workers(config: ClusterConfig) -> int:
    """One worker process per GPU, or one on a CPU-only machine (torch uses its cores)."""
    return config.workers or max(1, _gpu_count())


def default_torch_threads(config: ClusterConfig, workers: int) -> int:
    """Threads each worker's torch may use: the machine's cores shared between workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return config.torch_threads or max(1, (cores or 1) // workers)


def local_worker_settings(config: ClusterConfig) -> dict[str, object]:
    """Dask settings for the LocalCluster's workers (see the module docstring)."""
    return {"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1,
            "distributed.worker.profile.enabled": config.profile}


@contextmanager
def dask_client(config: ClusterConfig,
                announce: Callable[[str], None] = log.info) -> Iterator[Client]:
    """A client on the configured cluster; a LocalCluster lives only inside the block.
    ``announce`` receives one line saying where the graph runs and the dashboard address."""
    if config.scheduler:
        client = Client(config.scheduler)
        announce(f"Dask scheduler {config.scheduler}; dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return
    workers = default_workers(config)
    with dask.config.set(local_worker_settings(config)):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               resources={MODEL_RESOURCE: 1},
                               dashboard_address=config.dashboard, silence_logs=logging.ERROR)
    client = Client(cluster)
    announce(f"Dask LocalCluster of {workers} worker(s); dashboard "
             f"{client.dashboard_link if config.dashboard else 'off'}")
    try:
        yield client
    finally:
        client.close()
        cluster.close()
