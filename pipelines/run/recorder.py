"""Records what happens to each slide: the run database (one short transaction per event),
the run's logs, and one console line per finished slide. Also keeps the run's counts for the
summary and the report."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..extract_worker import ChunkResult
from .database import RunDatabase
from .logs import RunLogs, event
from .plan import SlidePlan
from .steps import Failure, StageOutcome

#: How a slide ended in this run: done (all its stages), failed, quarantined, interrupted.
OUTCOMES = ("done", "failed", "quarantined", "interrupted")


@dataclass
class RunCounts:
    """What the run did, for the summary line and the report."""

    outcomes: Counter[str] = field(default_factory=Counter)
    patches: int = 0
    extract_seconds: float = 0.0
    chunk_seconds: float = 0.0

    @property
    def processed(self) -> int:
        """Slides that ended in this run, well or not."""
        return sum(self.outcomes[name] for name in ("done", "failed", "quarantined"))


class RunRecorder:
    """Creates one :class:`SlideRecorder` per slide and sums up the run."""

    def __init__(self, database: RunDatabase, run_id: int, logs: RunLogs,
                 versions: dict[str, Any], say: Callable[[str], None], planned: int) -> None:
        self.database = database
        self.run_id = run_id
        self.logs = logs
        self.versions = versions
        self.say = say
        self.planned = planned
        self.counts = RunCounts()

    def slide(self, plan: SlidePlan) -> SlideRecorder:
        """The recorder of one slide's events."""
        return SlideRecorder(self, plan)

    def record_unreadable(self, plan: SlidePlan) -> None:
        """A slide whose files cannot be read fails its first stage without a task."""
        recorder = self.slide(plan)
        recorder.stage_started(plan.todo[0])
        recorder.stage_failed(plan.todo[0], Failure("failed", "error", plan.slide.error), 0.0)

    def finished(self, plan: SlidePlan, outcome: str, note: str) -> None:
        """A slide ended; print its line."""
        self.counts.outcomes[outcome] += 1
        position = f"[{sum(self.counts.outcomes.values())}/{self.planned}]"
        self.say(f"{position} {plan.slide.slide_id}: {note}")


class SlideRecorder:
    """The engine's :class:`~pipelines.run.flow.SlideEvents` for one slide."""

    def __init__(self, run: RunRecorder, plan: SlidePlan) -> None:
        self.run = run
        self.plan = plan
        self.slide_hash = plan.slide.slide_hash
        self.slide_id = plan.slide.slide_id
        self.started: dict[str, float] = {}
        self.notes: list[str] = []

    def _fields(self, stage: str, **more: Any) -> dict[str, Any]:
        return {"run": self.run.run_id, "slide": self.slide_id, "stage": stage, **more}

    def stage_started(self, stage: str) -> None:
        self.started[stage] = time.monotonic()
        self.run.database.start_stage(self.slide_hash, stage)
        event("stage_started", f"{self.slide_id}: {stage} started", **self._fields(stage))

    def _wall(self, stage: str) -> float:
        return time.monotonic() - self.started.get(stage, time.monotonic())

    def stage_finished(self, outcome: StageOutcome, seconds: float) -> None:
        stage, detail = outcome.stage, dict(outcome.detail)
        detail["wall_seconds"] = round(self._wall(stage), 3)
        database = self.run.database
        if stage not in self.started:  # finished without tasks of its own (e.g. cached)
            database.start_stage(self.slide_hash, stage)
        database.end_stage(self.slide_hash, stage, outcome.status, seconds=seconds,
                           detail=detail)
        counts = self.run.counts
        if stage == "extract" and outcome.status == "done":
            database.record_features(self.slide_hash, int(detail["patches"]),
                                     self.run.versions, self.run.run_id)
            if not detail.get("cached"):
                counts.patches += int(detail["patches"])
                counts.extract_seconds += seconds
        if stage == "predict" and outcome.status == "done":
            database.record_prediction(self.slide_hash, detail, float(detail["risk"]),
                                       str(detail["model_hash"]))
        self.notes.append(_note(stage, outcome))
        event("stage_finished", f"{self.slide_id}: {stage} {outcome.status} in {seconds:.1f} s",
              **self._fields(stage, status=outcome.status, seconds=round(seconds, 3),
                             detail=detail))
        if stage == self.plan.todo[-1]:
            self.run.finished(self.plan, "done", "; ".join(n for n in self.notes if n))

    def chunk_done(self, chunk: ChunkResult, patches_done: int, patches_total: int) -> None:
        """A chunk of the slide's features landed."""
        self.run.counts.chunk_seconds += chunk.seconds

    def _known(self, stage: str) -> str:
        """The stage as planned (a failure before any stage began counts for the first)."""
        return stage if stage in self.plan.todo else self.plan.todo[0]

    def stage_failed(self, stage: str, failure: Failure, seconds: float) -> None:
        stage = self._known(stage)
        reference = (self.run.logs.traceback_file(self.slide_id, stage, failure.traceback)
                     if failure.traceback else None)
        database = self.run.database
        database.end_stage(self.slide_hash, stage, failure.status, seconds=seconds,
                           detail={"kind": failure.kind,
                                   "wall_seconds": round(self._wall(stage), 3)},
                           error=failure.message, traceback=reference)
        database.drop_pending(self.slide_hash, self.plan.todo[self.plan.todo.index(stage) + 1:])
        event("stage_failed", f"{self.slide_id}: {failure.status} in {stage}: {failure.message}",
              logging.ERROR, **self._fields(stage, status=failure.status, kind=failure.kind,
                                            error=failure.message, traceback=reference))
        self.run.finished(self.plan, failure.status, f"{failure.status.upper()} in {stage}: "
                          f"{failure.message}")

    def stage_interrupted(self, stage: str) -> None:
        stage = self._known(stage)
        self.run.database.requeue_stage(self.slide_hash, stage)
        event("stage_interrupted", f"{self.slide_id}: {stage} interrupted; pending for the "
              "next run", logging.WARNING, **self._fields(stage))
        self.run.counts.outcomes["interrupted"] += 1


def _note(stage: str, outcome: StageOutcome) -> str:
    detail = outcome.detail
    if outcome.status == "skipped":
        return f"{stage} skipped ({detail.get('reason', '')})"
    if stage == "tile":
        return "no tissue" if detail.get("no_tissue") else ""
    if stage == "extract":
        return f"{detail['patches']} patches" + (" (features kept)" if detail.get("cached")
                                                 else "")
    if stage == "predict":
        probability = detail.get("probability")
        shown = f" (p = {probability:.3f})" if probability is not None else ""
        return f"{detail['predicted']}{shown}"
    return "heatmaps written" if stage == "export" else ""
