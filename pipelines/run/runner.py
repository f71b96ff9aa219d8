"""``slidepipe run``: one run over an archive, start to end.

1. Take the output folder's lock; mark what a killed run left ``running`` as pending again and
   remove its temporary files.
2. Load the backbone's and the model's identities (and check they match), discover the archive
   (slides, and radiology studies: :mod:`.studies`), hash new or changed files, deduplicate,
   and decide per slide or study which stages to (re)do.
3. Run every slide's chain as one Dask graph (:mod:`.flow`), recording each event in the
   database and the logs. ``max_runtime``, SIGTERM/SIGINT, a full disk or a cluster without
   workers stop it cleanly; what did not finish stays pending for the next run.
4. Write the HTML worklist of tonight's slides, ``predictions.csv``, ``report.json`` and
   ``report.html``; send the notification.

Output folder::

    OUT/run.lock, OUT/run.db                      the lock and the run database
    OUT/slides/<slide>/                           grid, tissue, features, prediction.csv
    OUT/slides/features_<backbone>/h5_files/      CLAM/TRIDENT exports
    OUT/heatmaps/<slide>/                         overlay, TIFF, GeoJSON, gallery, summary
    OUT/worklists/run-<id>/index.html             tonight's cases in deep-zoom viewers
    OUT/predictions.csv, OUT/report.json, OUT/report.html
    OUT/logs/run-<id>.log, .jsonl, tracebacks/
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import dask

import wsi
from wsi.atomic import remove_stale_partials

from .. import __version__
from ..cli_common import EXIT_FATAL, EXIT_OK, EXIT_SLIDES_FAILED
from ..cluster import dask_client
from ..config import ConfigError
from ..discovery import SlideEntry, discover_inputs
from ..extract import ExtractionSetup
from ..feature_store._layout import sweep_partials
from ..heatmaps.pseudonyms import PseudonymError
from ..radiology import StudyInput, StudyKeys
from ..radiology.extract import RadiologySetup
from ..tile import describe_error, given_mpp, write_csv_atomic
from .config import RunConfig
from .database import RunDatabase, SlideRow
from .export import WorklistSlide, write_worklist
from .flow import ArchiveFlow
from .inventory import UNREADABLE_PREFIX, Inventory, take_inventory
from .lock import RunLock
from .logs import RunLogs, event
from .notify import notify
from .plan import (
    HEATMAPS_DIR,
    KeyInputs,
    SlidePlan,
    decide,
    output_checks,
    stage_keys,
    unreadable_plan,
)
from .predict import ModelInfo
from .recorder import RunRecorder
from .report import RunFacts, build_report, write_report
from .slides import RunSetup, RunSlide
from .steps import FlowLimits, FlowOutcome
from .studies import (
    RunStudy,
    StudyInventory,
    is_study,
    study_output_checks,
    study_stage_keys,
    take_study_inventory,
)

log = logging.getLogger(__name__)

SLIDES_DIR = "slides"
WORKLISTS_DIR = "worklists"
PREDICTIONS_NAME = "predictions.csv"


@dataclass(frozen=True)
class RunResult:
    """How a run ended: its exit code (0, 1 or 2), the one-line summary and the report."""

    exit_code: int
    summary: str
    report: Path | None


def versions(setup: ExtractionSetup | None = None, model: ModelInfo | None = None
             ) -> dict[str, Any]:
    """The versions a run records (software, backbone weights, model)."""
    import torch

    found: dict[str, Any] = {"slidepipe": __version__, "torch": torch.__version__,
                             "dask": dask.__version__, "python": platform.python_version()}
    if setup is not None:
        found.update(backbone=setup.backbone.name, weights_hash=setup.backbone.weights_hash)
    if model is not None:
        found["model_hash"] = model.model_hash
    return found


@contextmanager
def _stop_on_signals(flow: ArchiveFlow) -> Iterator[None]:
    """SIGTERM and SIGINT stop the flow cleanly while it runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        flow.request_stop("interrupted", f"stopped by {name}; run again to continue")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_archive(config: RunConfig, *, command: str = "",
                say: Callable[[str], None] = log.info) -> RunResult:
    """Run ``config`` (see the module docstring). ``say`` receives the lines meant for the
    person or the cron mail. Raises ConfigError, ManifestError, BackboneError, RunLockedError
    or OSError for fatal problems; slides that fail are recorded, never raised."""
    if config.out is None:
        raise ConfigError("no output folder: set out in the run config or pass --out")
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with RunLock.acquire(out) as lock:
        database = RunDatabase.open(out)
        try:
            killed, requeued = database.recover_killed_runs()
            run_id = database.begin_run(os.getpid(), socket.gethostname(), command,
                                        config.model_dump(mode="json"), versions())
            with RunLogs(out, run_id) as logs:
                takeover = lock.takeover_message()
                if takeover:
                    say(takeover)
                    log.warning(takeover)
                if killed:
                    log.warning("runs %s ended without finishing (killed); %d stages they left "
                                "running are pending again", killed, requeued)
                try:
                    result = _run(config, out, database, run_id, logs, say, started, killed)
                except BaseException as error:
                    log.exception("run %d failed", run_id)
                    database.finish_run(run_id, "failed", {"error": describe_error(error)})
                    raise
        finally:
            database.close()
    if config.run.notify:
        problem = notify(config.run.notify, result.summary, result.exit_code, result.report)
        if problem:
            say(f"notification: {problem}")
    return result


def _sweep_leftovers(out: Path, database: RunDatabase, setup: ExtractionSetup) -> int:
    """Remove temporary files of killed writers: in the output folders, and inside the
    folders and stores of slides with unfinished stages (the lock guarantees no live run
    writes them)."""
    slides = out / SLIDES_DIR
    exports = setup.exports_folder
    folders = [out, slides, out / HEATMAPS_DIR, out / WORKLISTS_DIR, exports / "h5_files",
               exports / "pt_files"]
    removed = sum(remove_stale_partials(f) for f in folders if f.is_dir())
    known = database.slides()
    for slide_hash, rows in database.stages().items():
        if slide_hash in known and any(r.status == "pending" for r in rows.values()):
            slide_id = known[slide_hash].slide_id
            if (slides / slide_id).is_dir():
                removed += remove_stale_partials(slides / slide_id)
            if setup.store(slide_id).is_dir():
                removed += sweep_partials(setup.store(slide_id), min_age_s=0)
    return removed


def _inventory(config: RunConfig, database: RunDatabase, out: Path
               ) -> tuple[Inventory, dict[str, StudyInput], StudyKeys | None]:
    """The archive's slides and studies (recorded in the database), the studies' inputs by
    hash and their pseudonym keys (None without studies)."""
    found = discover_inputs(config.archive)
    if not found.slides and not found.studies:
        raise ConfigError("no slides or studies found in " + ", ".join(map(str, config.archive)))
    inventory = take_inventory(found.slides, database.paths(), database.slides(),
                               only=config.run.only, since=config.run.since)
    try:
        keys = StudyKeys.for_output(out, config.radiology.key_file) if found.studies else None
    except PseudonymError as error:
        raise ConfigError(str(error)) from error
    studies = (take_study_inventory(found.studies, keys, database.paths(), only=config.run.only,
                                    since=config.run.since) if keys is not None
               else StudyInventory([], {}))
    studies.add_to(inventory)
    database.drop_unreadable([path for s in inventory.slides if not s.error for path in s.paths],
                             UNREADABLE_PREFIX)
    database.record_slides(
        [(s.slide_hash, s.slide_id, str(s.entry.path), s.entry.mpp) for s in inventory.slides],
        [(path, s.slide_hash, signature) for s in inventory.slides
         for path, signature in zip(s.paths, s.signatures or ("",) * len(s.paths),
                                    strict=True)])
    return inventory, studies.inputs, keys


def _plan(inventory: Inventory, config: RunConfig, database: RunDatabase, out: Path,
          inputs: KeyInputs, radiology: RadiologySetup | None
          ) -> tuple[list[SlidePlan], Counter[str]]:
    rows = database.stages()
    present = output_checks(out, inputs.extraction)
    studies_present = study_output_checks(out, radiology) if radiology is not None else {}
    plans: list[SlidePlan] = []
    reasons: Counter[str] = Counter()
    for slide in inventory.slides:
        slide_rows = rows.get(slide.slide_hash, {})
        study = radiology is not None and is_study(slide.slide_hash)
        keys = (study_stage_keys(slide, radiology, inputs) if study and radiology is not None
                else stage_keys(slide, inputs))
        decision = (unreadable_plan(slide, slide_rows, config.run.retry_failed) if slide.error
                    else decide(slide, keys, slide_rows, config.stages,
                                studies_present if study else present,
                                config.run.retry_failed))
        if decision.plan is None:
            reasons[decision.reason] += 1
        else:
            plans.append(decision.plan)
    return plans, reasons


def _run(config: RunConfig, out: Path, database: RunDatabase, run_id: int, logs: RunLogs,
         say: Callable[[str], None], started: float, killed: list[int]) -> RunResult:
    pipeline = config.pipeline()
    overrides = (wsi.load_mpp_overrides(pipeline.slides.mpp_overrides)
                 if pipeline.slides.mpp_overrides else None)
    extraction = ExtractionSetup.create(pipeline, out / SLIDES_DIR, overrides)
    model = ModelInfo.load(config.model) if "predict" in config.stages else None
    radiology_config = config.radiology.model_copy(update={"backbone": pipeline.backbone,
                                                           "cluster": pipeline.cluster})
    if model is not None:
        model.check_features(extraction.backbone, [
            (pipeline.tiling.target_mpp, pipeline.tiling.patch_size),
            *radiology_config.bag_grids()])
    removed = _sweep_leftovers(out, database, extraction)
    if removed:
        log.info("removed %d temporary files left by a killed run", removed)
    inventory, studies, keys = _inventory(config, database, out)
    radiology = (RadiologySetup.create(radiology_config, out / SLIDES_DIR, keys)
                 if keys is not None else None)
    inputs = KeyInputs(extraction=extraction, model_hash=model.model_hash if model else None,
                       heatmap=config.heatmap.model_dump(mode="json"))
    plans, reasons = _plan(inventory, config, database, out, inputs, radiology)
    database.queue_stages(run_id, [(plan.slide.slide_hash, stage, plan.keys.get(stage, ""))
                                   for plan in plans for stage in plan.todo])
    archive = {"paths": inventory.found, "slides": len(inventory.slides),
               "copies": inventory.duplicates, "filtered_out": inventory.filtered_out,
               "hashed": inventory.hashed}
    planned = {"to_process": len(plans), "up_to_date": reasons["up_to_date"],
               "failed_before": reasons["failed_before"]}
    say(f"{inventory.found} slide paths: {len(inventory.slides)} distinct slides "
        f"({inventory.duplicates} copies), {len(plans)} to process, "
        f"{reasons['up_to_date']} up to date, {reasons['failed_before']} failed before"
        + (" (--retry-failed retries them)" if reasons["failed_before"] else ""))
    event("run_planned", f"run {run_id}: {len(plans)} slides to process", run=run_id,
          archive=archive, planned=planned)
    run_versions = versions(extraction, model)
    recorder = RunRecorder(database, run_id, logs, run_versions, say, len(plans))
    setup = RunSetup(out=out, config=config, extraction=extraction, model=model,
                     radiology=radiology, studies=studies)
    outcome, model_slots, flow_seconds = _process(plans, setup, recorder, database, say,
                                                  started)
    worklist = _write_worklist(database, run_id, setup, say) if outcome.stop_reason != \
        "disk_full" else None
    _write_predictions(database, out)
    counts = recorder.counts
    # failures of a killed run were never reported by an exit code: this run reports them
    inherited = database.failures_of(killed)
    exit_code = (EXIT_FATAL if outcome.stop_reason in ("disk_full", "interrupted", "no_workers")
                 else EXIT_SLIDES_FAILED if counts.outcomes["failed"]
                 + counts.outcomes["quarantined"] + inherited else EXIT_OK)
    wall = time.monotonic() - started
    summary = _summary_line(run_id, counts.outcomes, reasons, counts.patches,
                            counts.extract_seconds, wall, outcome, out, inherited)
    facts = RunFacts(run_id=run_id, out=out, state="stopped" if outcome.stop_reason else
                     "finished", stop_reason=outcome.stop_reason, message=outcome.message,
                     wall_seconds=wall, archive=archive, planned=planned,
                     outcomes={k: counts.outcomes[k] for k in ("done", "failed", "quarantined",
                                                               "interrupted")},
                     flow_seconds=flow_seconds, model_seconds=counts.chunk_seconds,
                     model_slots=model_slots,
                     worklist_index=worklist, summary=summary)
    report = build_report(database, facts)
    report_path = write_report(out, report)
    database.finish_run(run_id, facts.state, {"summary": summary, "exit_code": exit_code,
                                              **facts.outcomes}, run_versions)
    event("run_finished", summary, run=run_id, exit_code=exit_code, state=facts.state)
    return RunResult(exit_code=exit_code, summary=summary, report=report_path)


def _process(plans: list[SlidePlan], setup: RunSetup, recorder: RunRecorder,
             database: RunDatabase, say: Callable[[str], None], started: float
             ) -> tuple[FlowOutcome, int, float]:
    """Run the planned slides on the cluster; returns how the flow ended, the number of
    model slots it saw and the seconds it ran."""
    recorded = database.slides()
    works = []
    for plan in plans:
        if plan.slide.error:
            recorder.record_unreadable(plan)
            continue
        arguments = (plan, setup, recorder.slide(plan), recorded.get(plan.slide.slide_hash))
        study = setup.studies.get(plan.slide.slide_hash)
        chain = (RunStudy(*arguments, study=study, radiology=setup.radiology)
                 if study is not None and setup.radiology is not None else RunSlide(*arguments))
        works.append(chain.work())
    if not works:
        return FlowOutcome(None, "", 0, 0), 0, 0.0
    options = setup.config.run
    limits = FlowLimits(slide_timeout=options.slide_timeout,
                        deadline=(started + options.max_runtime) if options.max_runtime
                        else None, stop_grace=options.stop_grace or 0.0,
                        max_active_slides=options.max_active_slides)
    crashes = {"distributed.scheduler.allowed-failures": options.worker_crashes}
    with dask.config.set(crashes), dask_client(setup.config.cluster, say) as client:
        flow = ArchiveFlow(client, limits)
        flow_started = time.monotonic()
        with _stop_on_signals(flow):
            outcome = flow.run(works)
        flow_seconds = time.monotonic() - flow_started
    if outcome.stop_reason:
        say(f"stopped: {outcome.message}")
    return outcome, flow.model_slots, flow_seconds


def _write_worklist(database: RunDatabase, run_id: int, setup: RunSetup,
                    say: Callable[[str], None]) -> Path | None:
    """The HTML worklist of the slides exported by this run (None: none, or turned off);
    radiology studies are not in it (their exports are PNG and NIfTI files)."""
    if not setup.config.run.html_worklist:
        return None
    slides = database.slides()
    exported = [h for h, rows in database.stages(run_id).items()
                if rows.get("export") is not None and rows["export"].status == "done"
                and not is_study(h)]
    if not exported:
        return None
    extraction = setup.extraction
    chosen = [WorklistSlide(
        slide_id=slides[h].slide_id, slide_path=slides[h].path,
        store=extraction.store(slides[h].slide_id),
        grid_folder=extraction.out / slides[h].slide_id,
        prediction=slides[h].prediction or {}, risk=slides[h].risk or 0.0,
        mpp=_slide_mpp(slides[h], setup), qc_status="ok") for h in exported]
    folder = setup.out / WORKLISTS_DIR / f"run-{run_id:05d}"
    try:
        index = write_worklist(folder, chosen, setup.config.heatmap,
                               title=f"slidepipe run {run_id}: {len(chosen)} slides")
    except Exception as error:  # the worklist must not cost the night's results
        log.exception("the HTML worklist could not be written")
        say(f"the HTML worklist could not be written: {describe_error(error)}")
        return None
    say(f"worklist: {index}")
    return index


def _slide_mpp(slide: SlideRow, setup: RunSetup) -> float | None:
    entry = SlideEntry(path=Path(slide.path), slide_id=slide.slide_id, mpp=slide.manifest_mpp)
    return given_mpp(entry, setup.extraction.config, setup.extraction.mpp_overrides)


def _write_predictions(database: RunDatabase, out: Path) -> None:
    """``OUT/predictions.csv``: every predicted slide, in the columns ``slidepipe predict``
    writes (so ``slidepipe heatmap`` reads it), plus the risk."""
    rows = []
    for slide in sorted(database.slides().values(), key=lambda s: s.slide_id):
        if slide.prediction is None:
            continue
        prediction = slide.prediction
        row: dict[str, object] = {"slide_id": slide.slide_id,
                                  "predicted": prediction["predicted"]}
        row.update({f"prob_{name}": p for name, p in prediction["probabilities"].items()})
        row.update({"risk": slide.risk, "model_hash": prediction["model_hash"],
                    "attention": prediction["attention"]})
        rows.append(row)
    if rows:
        write_csv_atomic(out / PREDICTIONS_NAME, rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _summary_line(run_id: int, outcomes: Counter[str], reasons: Counter[str], patches: int,
                  extract_seconds: float, wall: float, outcome: FlowOutcome, out: Path,
                  inherited: int) -> str:
    processed = outcomes["done"] + outcomes["failed"] + outcomes["quarantined"]
    parts = [f"slidepipe run {run_id}: {processed} slides processed ({outcomes['done']} done, "
             f"{outcomes['failed']} failed, {outcomes['quarantined']} quarantined)"]
    if inherited:
        parts.append(f"{inherited} failed in the killed run before it")
    if outcomes["interrupted"]:
        parts.append(f"{outcomes['interrupted']} interrupted (pending)")
    parts.append(f"{reasons['up_to_date']} up to date")
    if reasons["failed_before"]:
        parts.append(f"{reasons['failed_before']} failed before")
    if patches:
        rate = f" at {patches / extract_seconds:.1f}/s" if extract_seconds else ""
        parts.append(f"{patches} patches{rate}")
    parts.append(f"in {_duration(wall)}")
    if outcome.stop_reason:
        parts.append(f"stopped early ({outcome.stop_reason})")
    return ", ".join(parts) + f"; report: {out / 'report.html'}"
