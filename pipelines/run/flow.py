"""The engine that moves slides through their stages as one Dask graph of futures.

Each slide is a :class:`SlideWork`: a chain of :class:`Step` values, each a set of tasks
submitted together and a client-side continuation that, given their results, says which stages
finished and what to submit next (so a slide's extraction chunks are known only once its grid
is). All slides share one client, so slides flow in parallel: while the model workers embed
one slide's chunks, other workers tile the next ones and finish the previous ones.

Placement and order. Tasks ask for one of two pools: ``model`` tasks need the worker resource
``MODEL`` (the backbone), ``cpu`` tasks go to workers without it when the cluster has any, else
share the model workers. The client keeps each pool's queue itself and hands a pool only as
many tasks as it has slots (threads, or ``MODEL`` units), best first: tasks that finish a slide
before extraction chunks, chunks before tiling new slides, earlier slides first. A worker
therefore holds only the tasks it is running, which keeps Dask's crash accounting fair: when a
worker process dies, the tasks it held are the ones that were executing.

Failures. A task that returns an error fails its slide's stage (the other slides go on). A
task whose worker died more than ``distributed.scheduler.allowed-failures`` times comes back as
``KilledWorker`` and the slide is quarantined as a crash. A slide whose tasks have run longer
than ``slide_timeout`` in total is quarantined as a hang: its tasks are cancelled and the
workers still holding them are restarted. (A task counts from its submission: as a pool is
handed only as many tasks as it has slots, a submitted task is an executing one.) An error
with ``ENOSPC``/``EDQUOT`` stops the whole run (no slide is to blame), as do a signal and the
end of ``max_runtime`` (new slides are not started; running ones get ``stop_grace`` seconds to
finish). Slides stopped that way are reported as interrupted, to be resumed by the next run.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import queue
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, Future, KilledWorker

from ..cluster import MODEL_RESOURCE
from ..tile import describe_error
from .steps import (
    POOLS,
    Failure,
    FlowLimits,
    FlowOutcome,
    Next,
    Pool,
    SlideWork,
    Step,
)
from .worker import TaskError, TaskOutput, call_task

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Seconds without any worker able to take queued work before the run gives up.
WORKER_WAIT_S = 120.0


@dataclass(frozen=True)
class _Capacity:
    model: int
    cpu: int
    shared: bool
    cpu_workers: tuple[str, ...]


@dataclass
class _Active:
    """A slide under way."""

    work: SlideWork
    order: int
    stage: str | None = None
    step: Step | None = None
    step_number: int = 0
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    futures: dict[str, Future] = field(default_factory=dict)
    submitted: dict[str, float] = field(default_factory=dict)
    stage_seconds: float = 0.0
    compute_seconds: float = 0.0
    closed: bool = False


@dataclass(order=True)
class _Queued:
    priority: tuple[int, int, int]
    sequence: int
    active: _Active = field(compare=False)
    step_number: int = field(compare=False)
    index: int = field(compare=False)


class ArchiveFlow:
    """Runs :class:`SlideWork` items on a Dask client; see the module docstring."""

    def __init__(self, client: Client, limits: FlowLimits | None = None) -> None:
        self.client = client
        self.limits = limits or FlowLimits()
        self._done: queue.Queue[Future] = queue.Queue()
        self._queues: dict[Pool, list[_Queued]] = {pool: [] for pool in POOLS}
        self._in_flight: dict[Pool, int] = dict.fromkeys(POOLS, 0)
        self._futures: dict[str, tuple[_Active, int, Pool]] = {}
        self._active: list[_Active] = []
        self._sequence = itertools.count()
        self._order = itertools.count()
        self._capacity = _Capacity(0, 0, True, ())
        self._stop: tuple[str, str] | None = None
        self._stopping: tuple[str, str] | None = None
        self._grace_until: float | None = None
        self._started = self._interrupted = 0
        self._starved_since: float | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def model_slots(self) -> int:
        """The model slots (``MODEL`` units) the cluster had at the last look."""
        return self._capacity.model

    def request_stop(self, reason: str, message: str) -> None:
        """Stop as soon as possible (signal handlers may call this): slides under way are
        cancelled and reported as interrupted."""
        self._stop = (reason, message)

    def run(self, works: Iterable[SlideWork]) -> FlowOutcome:
        """Run every slide (or until stopped); never raises for one slide's failure."""
        pending: Iterator[SlideWork] = iter(works)
        exhausted = False
        self._refresh_capacity()
        next_poll = time.monotonic() + self.limits.poll_seconds
        while True:
            if self._stop is not None:
                self._stop_now(*self._stop)
                break
            if self._stopping is None and not exhausted:
                exhausted = self._admit(pending)
            self._submit_ready()
            if not self._active and (exhausted or self._stopping is not None):
                break
            self._wait_for_results()
            now = time.monotonic()
            if now >= next_poll:
                self._poll(now)
                next_poll = now + self.limits.poll_seconds
        reason, message = self._stopping or (None, "")
        if reason == "max_runtime" and exhausted and not self._interrupted:
            reason, message = None, ""  # everything finished within the grace period
        return FlowOutcome(stop_reason=reason, message=message, started=self._started,
                           interrupted=self._interrupted)

    # -- admission and submission --------------------------------------------------------------
    def _max_active(self) -> int:
        if self.limits.max_active_slides:
            return self.limits.max_active_slides
        capacity = self._capacity
        return max(2, capacity.model + (0 if capacity.shared else capacity.cpu) + 2)

    def _admit(self, pending: Iterator[SlideWork]) -> bool:
        """Start slides while there is room; True when no slide is left to start."""
        while len(self._active) < self._max_active():
            work = next(pending, None)
            if work is None:
                return True
            active = _Active(work=work, order=next(self._order))
            self._active.append(active)
            self._started += 1
            self._continue(active, work.start)
        return False

    def _continue(self, active: _Active, produce: Callable[[], Next]) -> None:
        """Apply what a continuation returns (calling it here, so its errors fail the slide)."""
        while not active.closed:
            try:
                following = produce()
            except Exception as error:
                log.exception("%s: error in the %s stage", active.work.slide_id, active.stage)
                self._fail(active, Failure("failed", "error", describe_error(error),
                                           traceback.format_exc()))
                return
            for outcome in following.finished:
                seconds = active.stage_seconds if outcome.stage == active.stage else 0.0
                if outcome.stage == active.stage:
                    active.stage_seconds = 0.0
                active.work.events.stage_finished(outcome, seconds)
            step = following.step
            if step is None:
                self._close(active)
                return
            if step.stage != active.stage:
                active.stage, active.stage_seconds = step.stage, 0.0
                active.work.events.stage_started(step.stage)
            active.step, active.step_number = step, active.step_number + 1
            active.results, active.remaining = [None] * len(step.tasks), len(step.tasks)
            if step.tasks:
                for index, task in enumerate(step.tasks):
                    item = _Queued((task.priority, active.order, index), next(self._sequence),
                                   active, active.step_number, index)
                    heapq.heappush(self._queues[task.pool], item)
                return
            produce = _then(step, [])

    def _head(self, pool: Pool) -> _Queued | None:
        heap = self._queues[pool]
        while heap and (heap[0].active.closed
                        or heap[0].step_number != heap[0].active.step_number):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _has_room(self, pool: Pool) -> bool:
        capacity, busy = self._capacity, self._in_flight
        if pool == "model":
            room = busy["model"] < capacity.model
            return room and (not capacity.shared or busy["model"] + busy["cpu"] < capacity.cpu)
        if capacity.shared:
            return busy["model"] + busy["cpu"] < capacity.cpu
        return busy["cpu"] < capacity.cpu

    def _submit_ready(self) -> None:
        while True:
            heads = {pool: head for pool in POOLS
                     if (head := self._head(pool)) is not None and self._has_room(pool)}
            if not heads:
                return
            pool = min(heads, key=lambda name: heads[name])
            item = heapq.heappop(self._queues[pool])
            self._submit(item, pool)

    def _submit(self, item: _Queued, pool: Pool) -> None:
        active = item.active
        assert active.step is not None
        task = active.step.tasks[item.index]
        key = f"slidepipe-{task.label}-{active.work.slide_id}-{uuid.uuid4().hex[:8]}"
        options: dict[str, Any] = {"key": key, "pure": False}
        if pool == "model":
            options["resources"] = {MODEL_RESOURCE: 1}
        elif self._capacity.cpu_workers:
            options.update(workers=list(self._capacity.cpu_workers), allow_other_workers=True)
        future = self.client.submit(call_task, task.function, task.job, **options)
        self._futures[key] = (active, item.index, pool)
        active.futures[key] = future
        active.submitted[key] = time.monotonic()
        self._in_flight[pool] += 1
        future.add_done_callback(self._done.put)

    # -- results ----------------------------------------------------------------------------
    def _wait_for_results(self) -> None:
        try:
            future = self._done.get(timeout=min(1.0, self.limits.poll_seconds))
        except queue.Empty:
            return
        while True:
            self._handle(future)
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                return

    def _handle(self, future: Future) -> None:
        tracked = self._futures.pop(future.key, None)
        if tracked is None:
            return  # cancelled by us
        active, index, pool = tracked
        self._in_flight[pool] -= 1
        active.futures.pop(future.key, None)
        active.submitted.pop(future.key, None)
        step = active.step
        assert step is not None
        label = step.tasks[index].label
        if future.status == "finished":
            output: TaskOutput = future.result()
            active.stage_seconds += output.seconds
            active.compute_seconds += output.seconds
            if output.error is not None:
                self._task_error(active, output.error, label, len(step.tasks))
                return
            active.results[index] = output.value
            active.remaining -= 1
            if step.on_result is not None:
                step.on_result(output.value)
            if active.remaining == 0:
                self._continue(active, _then(step, active.results))
            return
        error = future.exception() if future.status == "error" else None
        if isinstance(error, KilledWorker):
            self._fail(active, Failure(
                "quarantined", "crash",
                f"the worker process died {error.allowed_failures + 1} times while running "
                f"its {label} task (a crash in a decoder or the model, or out of memory); "
                "see the worker logs"))
        elif error is not None:
            self._fail(active, Failure("failed", "error", f"{label}: {describe_error(error)}",
                                       "".join(traceback.format_exception(error))))
        else:
            self._fail(active, Failure("failed", "error",
                                       f"{label}: the cluster cancelled the task"))

    def _task_error(self, active: _Active, error: TaskError, label: str, siblings: int) -> None:
        """A task returned an error: a full disk stops the run, anything else fails the
        slide (naming the task when the step had several, e.g. a chunk)."""
        if error.errno in DISK_FULL_ERRNOS:
            self._stop_now("disk_full", f"the disk is full: {error.message}; free space and "
                           "run again to continue where this run stopped")
            return
        message = error.message if siblings == 1 else f"{label}: {error.message}"
        self._fail(active, Failure("failed", "error", message, error.traceback))

    # -- ending slides ------------------------------------------------------------------------
    def _cancel(self, active: _Active) -> list[Future]:
        futures = list(active.futures.values())
        for key in list(active.futures):
            _, _, pool = self._futures.pop(key)
            self._in_flight[pool] -= 1
        active.futures.clear()
        active.submitted.clear()
        if futures:
            self.client.cancel(futures)
        return futures

    def _close(self, active: _Active) -> None:
        active.closed = True
        if active in self._active:
            self._active.remove(active)

    def _fail(self, active: _Active, failure: Failure) -> None:
        if active.closed:
            return
        self._cancel(active)
        self._close(active)
        log.error("%s: %s in the %s stage: %s", active.work.slide_id, failure.status,
                  active.stage, failure.message)
        active.work.events.stage_failed(active.stage or "", failure, active.stage_seconds)

    def _interrupt(self, active: _Active) -> None:
        self._cancel(active)
        self._close(active)
        self._interrupted += 1
        active.work.events.stage_interrupted(active.stage or "")

    def _stop_now(self, reason: str, message: str) -> None:
        if self._stopping is None or self._stopping[0] == "max_runtime":
            self._stopping = (reason, message)
        log.warning("stopping: %s", message)
        for active in list(self._active):
            self._interrupt(active)

    # -- periodic checks ------------------------------------------------------------------------
    def _poll(self, now: float) -> None:
        self._refresh_capacity()
        self._check_starvation(now)
        limits = self.limits
        if limits.deadline is not None and now >= limits.deadline and self._stopping is None:
            self._stopping = ("max_runtime", "the maximum run time was reached; slides not "
                              "started yet are left for the next run")
            self._grace_until = now + limits.stop_grace
            log.warning("%s (%d under way get %.0f s to finish)", self._stopping[1],
                        len(self._active), limits.stop_grace)
        if self._grace_until is not None and now >= self._grace_until and self._active:
            log.warning("stop grace over: interrupting %d slides", len(self._active))
            for active in list(self._active):
                self._interrupt(active)
        if limits.slide_timeout is not None:
            self._check_timeouts(limits.slide_timeout)

    def _refresh_capacity(self) -> None:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        model = cpu_threads = all_threads = 0
        cpu_workers = []
        for address, info in workers.items():
            threads = int(info.get("nthreads", 1))
            units = int(info.get("resources", {}).get(MODEL_RESOURCE, 0))
            all_threads += threads
            model += min(units, threads)
            if units == 0:
                cpu_threads += threads
                cpu_workers.append(address)
        shared = not cpu_workers
        self._capacity = _Capacity(model=model, cpu=all_threads if shared else cpu_threads,
                                   shared=shared, cpu_workers=tuple(sorted(cpu_workers)))

    def _check_starvation(self, now: float) -> None:
        """Give up when queued work has had no worker able to take it for a long time."""
        starved = [pool for pool in POOLS if self._head(pool) is not None
                   and self._in_flight[pool] == 0 and not self._has_room(pool)]
        if not starved:
            self._starved_since = None
            return
        self._starved_since = self._starved_since or now
        if now - self._starved_since > WORKER_WAIT_S:
            need = ("a worker with the MODEL resource (start model workers with "
                    "`dask worker … --resources MODEL=1`)" if "model" in starved else "workers")
            self.request_stop("no_workers", f"the cluster has had no {need} for "
                              f"{WORKER_WAIT_S:.0f} s")

    def _check_timeouts(self, timeout: float) -> None:
        now = time.monotonic()
        stuck: list[str] = []
        for active in list(self._active):
            running = sum(now - started for started in active.submitted.values())
            total = active.compute_seconds + running
            if total <= timeout:
                continue
            stuck += list(active.futures)
            self._fail(active, Failure(
                "quarantined", "timeout",
                f"timed out: its tasks ran {total:.0f} s in all, more than the slide timeout "
                f"of {timeout:.0f} s (last in its {active.stage} stage)"))
        if stuck:
            self._restart_workers_holding(set(stuck))

    def _restart_workers_holding(self, keys: set[str]) -> None:
        """Restart the workers still running cancelled tasks of timed-out slides: a hung
        task holds its thread until its process ends."""
        holding = sorted(address for address, held in self.client.processing().items()
                         if keys & set(held))
        if holding:
            log.warning("restarting workers stuck in timed-out tasks: %s", ", ".join(holding))
            self.client.restart_workers(holding, raise_for_error=False)


def _then(step: Step, results: list[Any]) -> Callable[[], Next]:
    return lambda: step.then(results)
