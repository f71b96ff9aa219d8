"""``slidepipe status OUT``: where a running or finished run stands, read from the run
database without taking the run lock (SQLite's WAL lets it read while the run writes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .database import RunDatabase
from .lock import read_holder
from .report import STAGE_ORDER, slide_state

FAILURES_SHOWN = 10


def read_status(out: Path) -> dict[str, Any]:
    """The status of the output folder ``out`` as plain data (raises FileNotFoundError when
    no run has used it)."""
    database = RunDatabase.open_readonly(out)
    try:
        runs = database.runs(limit=5)
        slides = database.slides()
        stages = database.stages()
    finally:
        database.close()
    holder = read_holder(out)
    latest = runs[0] if runs else None
    running = latest is not None and latest.state == "running"
    alive = holder.is_alive() if holder is not None else False
    status: dict[str, Any] = {
        "out": str(out), "active": bool(running and holder is not None and alive is not False),
        "lock": None if holder is None else {**holder.__dict__, "alive": alive},
        "runs": [{"run_id": r.run_id, "state": r.state, "started": r.started,
                  "finished": r.finished, "host": r.host, "pid": r.pid,
                  "summary": (r.summary or {}).get("summary")} for r in runs],
        "slides": {"total": len(slides), **Counter(slide_state(stages.get(h, {}))
                                                   for h in slides)},
        "stages": {stage: dict(Counter(rows[stage].status for rows in stages.values()
                                       if stage in rows)) for stage in STAGE_ORDER},
    }
    if latest is not None:
        mine = {h: rows for h, rows in stages.items()
                if any(row.run_id == latest.run_id for row in rows.values())}
        under_way = Counter(row.stage for rows in mine.values() for row in rows.values()
                            if row.status == "running")
        status["latest_run"] = {
            "run_id": latest.run_id, "state": latest.state, "slides": len(mine),
            "finished": sum(1 for rows in mine.values() if not any(
                row.status in ("pending", "running") for row in rows.values())),
            "under_way": dict(under_way)}
    failures = [{"slide_id": slides[h].slide_id, "stage": row.stage, "status": row.status,
                 "error": row.error, "traceback": row.traceback, "finished": row.finished}
                for h, rows in stages.items() for row in rows.values()
                if row.status in ("failed", "quarantined") and h in slides]
    failures.sort(key=lambda f: f["finished"] or "", reverse=True)
    status["failures"] = failures[:FAILURES_SHOWN]
    status["failure_count"] = len(failures)
    return status


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as lines for a terminal."""
    lines = []
    latest = status.get("latest_run")
    lock = status.get("lock")
    if status["active"] and latest is not None and lock is not None:
        lines.append(f"run {latest['run_id']} is running (pid {lock['pid']} on {lock['host']}, "
                     f"started {lock['started']}): {latest['finished']} of {latest['slides']} "
                     "slides finished" + (", under way: " + ", ".join(
                         f"{stage} {n}" for stage, n in latest["under_way"].items())
                         if latest["under_way"] else ""))
    elif latest is not None:
        run = status["runs"][0]
        if latest["state"] == "running":
            lines.append(f"run {latest['run_id']} did not finish (its process is gone; the "
                         "next run takes over and redoes its unfinished slides)")
        else:
            lines.append(f"last run {run['run_id']} {run['state']} at {run['finished']}")
        if run.get("summary"):
            lines.append(f"  {run['summary']}")
    slides = status["slides"]
    lines.append(f"slides: {slides['total']} (" + ", ".join(
        f"{slides.get(state, 0)} {state.replace('_', ' ')}" for state in (
            "done", "no_tissue", "failed", "quarantined", "pending", "running")) + ")")
    for stage, counts in status["stages"].items():
        if counts:
            lines.append(f"  {stage:8s} " + ", ".join(f"{n} {s}" for s, n in
                                                     sorted(counts.items())))
    if status["failures"]:
        lines.append(f"failures ({status['failure_count']}, latest first):")
        lines += [f"  {f['slide_id']} [{f['stage']}, {f['status']}]: {f['error']}"
                  for f in status["failures"]]
    return lines
