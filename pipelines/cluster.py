"""Dask clusters for slidepipe: a LocalCluster sized to the machine by default, or an existing
cluster (``tcp://HOST:PORT``, dask-jobqueue, Kubernetes) when the user names its scheduler.

The same graph runs on either. Model workers are declared by the worker resource ``MODEL`` (one
per worker process, so one process per GPU holds one model); tasks that run a backbone ask for
one unit of it, so on an existing cluster only workers started with ``--resources MODEL=1``
(and a GPU, where there is one) receive them.

Without a GPU the LocalCluster has one single-threaded model worker per core, up to
``CPU_WORKERS_MAX`` and one per ``CPU_WORKER_MEMORY`` of RAM; the cores left over become torch
threads (ADR 0005). Independent processes keep the cores busy where one process's multi-threaded
operators wait at every barrier for their slowest thread, which a decode thread, the OS or a
neighbouring VM has just preempted: 1.2-1.5x more patches/s on the 2-core benchmark machine.

LocalCluster workers are started for CPU inference (ADR 0004): glibc gets one malloc arena
(``MALLOC_ARENA_MAX=1``, read only at process start), because a Dask task runs in a worker
thread and thread arenas cannot keep a batch's 100 MB activations, which are then mapped and
page-faulted afresh on every forward pass (half the speed of the same code in a main thread);
and Dask's statistical profiler (a 10 ms stack sampler that holds the GIL and competes with
torch's threads) is off unless ``profile: true``; its housekeeping timers run less often
(``LOCAL_HOUSEKEEPING``). Workers of an existing cluster should be started with the same
environment variable (see the README).

LocalCluster workers are forked from a forkserver that has imported torch, timm and slidepipe's
worker modules once (``WORKER_PRELOAD``), instead of each spawned worker importing them again:
the first cluster of a process is up about 1.5 s sooner on 2 cores, later ones (tests, a
long-lived client) in a fraction of a second, and closing no longer waits 2 s for spawned
interpreters to exit. Those imports still take 4-5 s on 2 cores, so the ``slidepipe`` command
starts the forkserver (:func:`start_worker_forkserver`) before it imports the CLI, and both
import side by side (:mod:`pipelines.launch`). The forkserver starts with the environment a
nanny gives its worker (``MALLOC_ARENA_MAX`` and Dask's ``pre-spawn-environ``), which every
worker forked from it keeps.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
import psutil
from distributed import Client, LocalCluster
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MODEL_RESOURCE = "MODEL"
#: Modules the forkserver imports before it forks LocalCluster workers.
WORKER_PRELOAD = ("distributed", "numpy", "torch", "timm", "pipelines.extract_worker")
#: At most this many LocalCluster model workers on a CPU-only machine (each holds a model).
CPU_WORKERS_MAX = 8
#: RAM set aside per CPU model worker (model, a batch's activations, decode buffers).
CPU_WORKER_MEMORY = 3 * 2**30


class ClusterConfig(BaseModel):
    """Where the graph runs (the ``cluster:`` section)."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = Field(
        None, description="address of an existing Dask scheduler (tcp://HOST:PORT); "
        "None starts a LocalCluster")
    workers: int | None = Field(
        None, ge=1, description="LocalCluster worker processes (default: one per GPU; without "
        "a GPU one per core, at most 8 and one per 3 GiB of RAM)")
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


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(config: ClusterConfig) -> int:
    """The configured workers, else one per GPU, else one per core within the CPU caps."""
    if config.workers:
        return config.workers
    gpus = _gpu_count()
    if gpus:
        return gpus
    memory_slots = psutil.virtual_memory().total // CPU_WORKER_MEMORY
    return int(max(1, min(_cores(), CPU_WORKERS_MAX, memory_slots)))


def default_torch_threads(config: ClusterConfig, workers: int) -> int:
    """Threads each worker's torch may use: the machine's cores shared between workers."""
    return config.torch_threads or max(1, _cores() // workers)


#: Dask's housekeeping on a LocalCluster, less often than its defaults (event-loop tick 20 ms,
#: system monitor 500 ms, memory monitor 100 ms), which suit a shared cluster's dashboard more
#: than a machine whose every core runs a model: measured on 2 cores with efficientnet_lite0,
#: the client process (scheduler and nannies) used 0.6-0.8 s of CPU per 42 s extraction call
#: instead of 2.1-2.7 s, 2 % of the machine handed back to the model workers.
LOCAL_HOUSEKEEPING = {"distributed.admin.tick.interval": "500ms",
                      "distributed.admin.system-monitor.interval": "2s",
                      "distributed.worker.memory.monitor-interval": "500ms"}


def local_worker_settings(config: ClusterConfig) -> dict[str, object]:
    """Dask settings for the LocalCluster, its scheduler and its workers (see the module
    docstring and ``LOCAL_HOUSEKEEPING``)."""
    return {"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1,
            "distributed.worker.profile.enabled": config.profile,
            "distributed.worker.multiprocessing-method": "forkserver",
            **LOCAL_HOUSEKEEPING}


def _worker_environment() -> dict[str, str]:
    """What a nanny sets before it starts its worker process (Dask's ``pre-spawn-environ``,
    values already in the environment winning, and a fixed ``PYTHONHASHSEED``), under the
    LocalCluster's settings."""
    settings = dask.config.get("distributed.nanny.pre-spawn-environ")
    environment = {key: os.environ.get(key, str(value)) for key, value in settings.items()
                   if value is not None}
    if environment.get("PYTHONHASHSEED") in (None, "0"):
        environment["PYTHONHASHSEED"] = "6640"  # Dask's value: the same hashes on every worker
    return environment


def start_worker_forkserver() -> None:
    """Start the forkserver that LocalCluster workers are forked from, if it is not running:
    it imports ``WORKER_PRELOAD`` in the background while the caller goes on (see the module
    docstring). Distributed sets its own preload list the first time it asks for the context;
    this one replaces it, and a running server keeps what it has. Starting it for a run that
    then uses an existing cluster costs one idle process until this one exits."""
    from distributed.utils import get_mp_context

    with dask.config.set(local_worker_settings(ClusterConfig())):
        get_mp_context()
        environment = _worker_environment()
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:  # this process keeps its own environment
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


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
    start_worker_forkserver()
    # The settings hold for the cluster's lifetime: a worker the nanny restarts is forked too.
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
