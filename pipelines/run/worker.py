"""The worker side of every slidepipe task: timing, and errors the client can read.

Each task runs through :func:`call_task`, which

* measures how long the task executed (the client sums it per slide for the slide timeout and
  the stage timings);
* returns any exception as a :class:`TaskError` inside its :class:`TaskOutput` instead of
  raising it: a bad slide is an expected outcome, not a Dask error (which workers would log
  at length), and exceptions of the slide layer do not survive pickling on their own.
"""

from __future__ import annotations

import time
import traceback as traceback_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tile import describe_error


@dataclass(frozen=True)
class TaskError:
    """A task's error as it reaches the client: the one-line message, the original
    exception's class name, the formatted traceback from the worker, and the ``errno`` of the
    first ``OSError`` in its chain (so the client can tell a full disk from a bad slide)."""

    message: str
    error_type: str
    traceback: str
    errno: int | None


@dataclass(frozen=True)
class TaskOutput:
    """What a task returns: its value (None when it failed), the seconds it spent
    executing, and its error, if any."""

    value: Any
    seconds: float
    error: TaskError | None = None


def error_errno(error: BaseException) -> int | None:
    """The ``errno`` of ``error`` or of the first ``OSError`` it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def call_task(function: Callable[[Any], Any], job: Any) -> TaskOutput:
    """Run ``function(job)`` on a worker; see the module docstring."""
    start = time.monotonic()
    try:
        return TaskOutput(function(job), time.monotonic() - start)
    except Exception as error:
        return TaskOutput(None, time.monotonic() - start, TaskError(
            describe_error(error), type(error).__name__, traceback_module.format_exc(),
            error_errno(error)))
