"""The run report: ``OUT/report.json`` and ``OUT/report.html`` (both written atomically).

They hold the counts (this run and the whole archive), failures with their reasons and
traceback files, per-stage timings and throughput of this run, and the triage worklist: every
predicted slide sorted by risk, with grade and probability, linking to its heatmap overlay
and, for tonight's slides, its deep-zoom viewer page.
"""

from __future__ import annotations

import csv
import html
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi.atomic import write_json_atomic, write_text_atomic

from .database import RunDatabase, SlideRow, StageRow
from .plan import HEATMAPS_DIR

REPORT_SCHEMA = "slidepipe.run-report/1"
STAGE_ORDER = ("tile", "extract", "predict", "export")


def slide_state(rows: Mapping[str, StageRow]) -> str:
    """One word for a slide across its stages: quarantined, failed, running, pending,
    no_tissue or done."""
    statuses = {row.status for row in rows.values()}
    for state in ("quarantined", "failed", "running", "pending"):
        if state in statuses:
            return state
    tile = rows.get("tile")
    if tile is not None and tile.detail.get("no_tissue"):
        return "no_tissue"
    return "done" if statuses else "pending"


@dataclass(frozen=True)
class RunFacts:
    """What the runner knows about the run beyond the database."""

    run_id: int
    out: Path
    state: str
    stop_reason: str | None
    message: str
    wall_seconds: float
    flow_seconds: float
    archive: dict[str, int]
    planned: dict[str, int]
    outcomes: dict[str, int]
    model_seconds: float
    model_slots: int
    worklist_index: Path | None
    summary: str


def _stage_table(stages: Mapping[str, Mapping[str, StageRow]], run_id: int
                 ) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for stage in STAGE_ORDER:
        rows = [r[stage] for r in stages.values() if stage in r and r[stage].run_id == run_id
                and r[stage].status in ("done", "skipped", "failed", "quarantined")]
        if not rows:
            continue
        counted = Counter(row.status for row in rows)
        seconds = sum(row.seconds or 0.0 for row in rows)
        worked = [row for row in rows if row.status == "done" and not row.detail.get("cached")]
        entry: dict[str, Any] = {**{s: counted[s] for s in ("done", "skipped", "failed",
                                                              "quarantined")},
                                 "seconds": round(seconds, 3),
                                 "mean_seconds": round(seconds / len(rows), 3)}
        if stage == "extract":
            patches = sum(int(row.detail.get("patches", 0)) for row in worked)
            work_seconds = sum(row.seconds or 0.0 for row in worked)
            entry["patches"] = patches
            entry["patches_per_second"] = round(patches / work_seconds, 1) if work_seconds \
                else None
        table[stage] = entry
    return table


def _viewer_pages(worklist_index: Path | None, out: Path) -> dict[str, str]:
    """Slide id → viewer page (relative to ``out``) from the HTML worklist's CSV."""
    if worklist_index is None:
        return {}
    table = worklist_index.parent / "worklist.csv"
    base = worklist_index.parent.relative_to(out)
    with open(table, newline="") as handle:
        return {row["slide"]: f"{base}/{row['viewer']}" for row in csv.DictReader(handle)
                if row.get("viewer")}


def build_report(database: RunDatabase, facts: RunFacts) -> dict[str, Any]:
    """The report's data (see the module docstring)."""
    slides: dict[str, SlideRow] = database.slides()
    stages = database.stages()
    states = Counter(slide_state(stages.get(h, {})) for h in slides)
    failures = []
    for slide_hash, rows in stages.items():
        for stage in STAGE_ORDER:
            row = rows.get(stage)
            if row is not None and row.status in ("failed", "quarantined"):
                slide = slides[slide_hash]
                failures.append({"slide_id": slide.slide_id, "path": slide.path,
                                 "stage": stage, "status": row.status,
                                 "kind": row.detail.get("kind", "error"), "error": row.error,
                                 "traceback": row.traceback, "run": row.run_id})
    viewers = _viewer_pages(facts.worklist_index, facts.out)
    worklist = []
    for slide_hash, slide in slides.items():
        if slide.prediction is None or slide_state(stages.get(slide_hash, {})) != "done":
            continue
        overlay = Path(HEATMAPS_DIR) / slide.slide_id / "overlay.png"
        predicted_in = stages[slide_hash]["predict"].run_id if "predict" in stages[
            slide_hash] else None
        worklist.append({
            "slide_id": slide.slide_id, "grade": slide.prediction["predicted"],
            "probability": slide.prediction.get("probability"), "risk": slide.risk,
            "probabilities": slide.prediction["probabilities"],
            "overlay": str(overlay) if (facts.out / overlay).is_file() else None,
            "viewer": viewers.get(slide.slide_id), "new": predicted_in == facts.run_id})
    worklist.sort(key=lambda row: (-(row["risk"] or 0.0), row["slide_id"]))
    run = database.runs(limit=50)
    this = next((r for r in run if r.run_id == facts.run_id), None)
    model_busy = (facts.model_seconds / (facts.flow_seconds * facts.model_slots)
                  if facts.flow_seconds and facts.model_slots else None)
    return {
        "schema": REPORT_SCHEMA, "summary": facts.summary,
        "run": {"id": facts.run_id, "state": facts.state, "stop_reason": facts.stop_reason,
                "message": facts.message, "started": this.started if this else None,
                "host": this.host if this else None, "pid": this.pid if this else None,
                "command": this.command if this else None,
                "versions": this.versions if this else None,
                "wall_seconds": round(facts.wall_seconds, 3),
                "flow_seconds": round(facts.flow_seconds, 3),
                "model_busy_fraction": round(model_busy, 3) if model_busy is not None
                else None},
        "archive": facts.archive, "planned": facts.planned, "this_run": facts.outcomes,
        "totals": {"slides": len(slides), **{s: states[s] for s in (
            "done", "no_tissue", "failed", "quarantined", "pending", "running")}},
        "stages": _stage_table(stages, facts.run_id),
        "failures": sorted(failures, key=lambda f: (f["slide_id"], f["stage"])),
        "worklist": worklist,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _link(target: str | None, text: str) -> str:
    return f'<a href="{html.escape(target)}">{html.escape(text)}</a>' if target else ""


def render_html(report: dict[str, Any]) -> str:
    """The report as a self-contained HTML page (every value escaped)."""
    run, totals = report["run"], report["totals"]
    counts = _table(["", *[k for k in totals if k != "slides"], "slides"], [
        ["archive", *[_cell(v) for k, v in totals.items() if k != "slides"],
         _cell(totals["slides"])]])
    this_run = _table(list(report["this_run"]), [[_cell(v) for v in report["this_run"].values()]])
    stages = _table(["stage", "done", "skipped", "failed", "quarantined", "seconds",
                     "mean s/slide", "patches", "patches/s"],
                    [[html.escape(stage), *[_cell(row.get(k)) for k in (
                        "done", "skipped", "failed", "quarantined", "seconds", "mean_seconds",
                        "patches", "patches_per_second")]]
                     for stage, row in report["stages"].items()])
    failures = _table(["slide", "stage", "status", "reason", "traceback", "path"],
                      [[_cell(f["slide_id"]), _cell(f["stage"]), _cell(f["status"]),
                        _cell(f["error"]), _link(f["traceback"], "traceback"),
                        _cell(f["path"])] for f in report["failures"]])
    worklist = _table(["#", "slide", "grade", "probability", "risk", "heatmap", "viewer",
                       "tonight"],
                      [[str(rank), _cell(w["slide_id"]), _cell(w["grade"]),
                        _cell(w["probability"]), _cell(w["risk"]),
                        _link(w["overlay"], "overlay"), _link(w["viewer"], "viewer"),
                        "new" if w["new"] else ""]
                       for rank, w in enumerate(report["worklist"], start=1)])
    busy = run.get("model_busy_fraction")
    facts = [f"state: {run['state']}", f"host: {run.get('host')}",
             f"wall time: {run['wall_seconds']:.1f} s"]
    if busy is not None:
        facts.append(f"model workers busy: {100 * busy:.0f} %")
    message = f"<p class=warn>{html.escape(run['message'])}</p>" if run.get("message") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>slidepipe run {run['id']}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f0f0f0; }}
.warn {{ color: #a40; font-weight: bold; }}
</style></head><body>
<h1>slidepipe run {run['id']}</h1>
<p>{html.escape(report['summary'])}</p>
<p>{' · '.join(html.escape(f) for f in facts)}</p>
{message}
<h2>Slides</h2>{counts}
<h3>This run</h3>{this_run}
<h2>Stages (this run)</h2>{stages}
<h2>Triage worklist</h2>{worklist}
<h2>Failures</h2>{failures if report['failures'] else '<p>none</p>'}
</body></html>
"""


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.html`` into ``out``; returns the HTML path."""
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.html", render_html(report))
    return out / "report.html"
