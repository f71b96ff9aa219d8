"""The vocabulary of a slide's chain through the run: :class:`Task` (a call on a worker),
:class:`Step` (the tasks of one stage and the continuation that reads their results),
:class:`Next`, :class:`StageOutcome`, :class:`Failure`, :class:`SlideWork` (one slide for the
engine, with the :class:`SlideEvents` it reports) and the engine's :class:`FlowLimits` and
:class:`FlowOutcome`. The engine itself is :class:`pipelines.run.flow.ArchiveFlow`; the stages
of slides (:mod:`.slides`), radiology studies (:mod:`.studies`) and plain extraction
(:mod:`pipelines.extract`) are written in these terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Pool = Literal["model", "cpu"]
POOLS: tuple[Pool, ...] = ("model", "cpu")

#: Task priorities (lower runs first): work that completes a started slide, extraction chunks,
#: then work that starts a new slide.
FINISHING, EMBEDDING, STARTING = 0, 1, 2



@dataclass(frozen=True)
class Task:
    """One function call on a worker: ``function(job)``, in a pool, with a priority."""

    function: Callable[[Any], Any]
    job: Any
    pool: Pool
    label: str
    priority: int = FINISHING


@dataclass(frozen=True)
class StageOutcome:
    """A stage that ended well: ``done``, or ``skipped`` with the reason in ``detail``."""

    stage: str
    status: Literal["done", "skipped"]
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Next:
    """What a continuation returns: stages now finished, and the step to run next (None: the
    slide is finished)."""

    finished: list[StageOutcome] = field(default_factory=list)
    step: Step | None = None


@dataclass
class Step:
    """Tasks of one stage submitted together; ``then(results)`` is called on the client with
    their return values in order once all are done. ``on_result`` sees each as it lands."""

    stage: str
    tasks: list[Task]
    then: Callable[[list[Any]], Next]
    on_result: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class Failure:
    """Why a slide's stage did not finish: ``failed`` (an error) or ``quarantined`` (a crash
    or a hang), with the message and the traceback (empty when there is none)."""

    status: Literal["failed", "quarantined"]
    kind: Literal["error", "crash", "timeout"]
    message: str
    traceback: str = ""


class SlideEvents(Protocol):
    """What the engine reports about one slide."""

    def stage_started(self, stage: str) -> None:
        """A stage's first tasks were queued."""

    def stage_finished(self, outcome: StageOutcome, seconds: float) -> None:
        """A stage ended well; ``seconds``: its tasks' executing time."""

    def stage_failed(self, stage: str, failure: Failure, seconds: float) -> None:
        """A stage failed or the slide was quarantined; the slide goes no further."""

    def stage_interrupted(self, stage: str) -> None:
        """The run stopped while the stage was under way; it is to be redone."""


@dataclass
class SlideWork:
    """One slide for the engine: ``start()`` gives its first stages (and may finish some at
    once, e.g. everything already done), ``events`` hears how it goes."""

    slide_id: str
    start: Callable[[], Next]
    events: SlideEvents


@dataclass(frozen=True)
class FlowLimits:
    """Time limits of a flow (seconds; ``deadline`` on the ``time.monotonic`` clock)."""

    slide_timeout: float | None = None
    deadline: float | None = None
    stop_grace: float = 600.0
    max_active_slides: int | None = None
    poll_seconds: float = 2.0


@dataclass(frozen=True)
class FlowOutcome:
    """How a flow ended: ``stop_reason`` is None when every slide was run to its end, else
    ``max_runtime``, ``disk_full``, ``interrupted`` or ``no_workers``, explained in
    ``message``. ``interrupted`` counts slides stopped under way."""

    stop_reason: str | None
    message: str
    started: int
    interrupted: int


def continue_after(finished: list[StageOutcome], after: Callable[[], Next] | None) -> Next:
    """``finished``, followed by what ``after`` starts (the stages chained behind a slide's
    extraction in a run), when there is something after."""
    if after is None:
        return Next(finished)
    following = after()
    return Next(finished + following.finished, following.step)
