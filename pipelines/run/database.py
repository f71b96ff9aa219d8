"""The run database: ``OUT/run.db``, SQLite in WAL mode, one writer (the run's client
process), short transactions; readers (``slidepipe status``, reports) never block it.

Tables::

    runs         one row per run: times, state (running, finished, stopped, failed, killed),
                 pid/host/command, resolved config, versions, summary
    slides       one row per distinct slide (content hash): its id, current path, the µm/px a
                 manifest gave, patches, prediction (grade, probabilities, risk), versions
    slide_paths  every path a slide was found at (copies and renames), with the file
                 signature (sizes, mtimes) that lets a rerun skip re-hashing unchanged files
    stages       per slide and stage (tile, extract, predict, export): status (pending,
                 running, done, skipped, failed, quarantined), the settings key it was made
                 with, run, attempts, times, error and traceback file, details (JSON)

A stage is done for a rerun only when its key still matches (slide content + settings); rows
left ``running`` by a killed run become ``pending`` when the next run starts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATABASE_NAME = "run.db"
SCHEMA_VERSION = 1
STAGE_STATUSES = ("pending", "running", "done", "skipped", "failed", "quarantined")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, finished TEXT, state TEXT NOT NULL,
    pid INTEGER, host TEXT, command TEXT, config TEXT, versions TEXT, summary TEXT);
CREATE TABLE IF NOT EXISTS slides (
    slide_hash TEXT PRIMARY KEY, slide_id TEXT NOT NULL UNIQUE, path TEXT NOT NULL,
    manifest_mpp REAL, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL, last_run INTEGER,
    patches INTEGER, prediction TEXT, risk REAL, model_hash TEXT, versions TEXT);
CREATE TABLE IF NOT EXISTS slide_paths (
    path TEXT PRIMARY KEY,
    slide_hash TEXT NOT NULL REFERENCES slides(slide_hash),
    signature TEXT NOT NULL, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
    slide_hash TEXT NOT NULL REFERENCES slides(slide_hash), stage TEXT NOT NULL,
    status TEXT NOT NULL, key TEXT, run_id INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    started TEXT, finished TEXT, seconds REAL, error TEXT, traceback TEXT, detail TEXT,
    PRIMARY KEY (slide_hash, stage));
CREATE INDEX IF NOT EXISTS stages_by_run ON stages(run_id);
"""


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class StageRow:
    """One slide's state in one stage."""

    slide_hash: str
    stage: str
    status: str
    key: str | None
    run_id: int | None
    attempts: int
    started: str | None
    finished: str | None
    seconds: float | None
    error: str | None
    traceback: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class SlideRow:
    """One distinct slide."""

    slide_hash: str
    slide_id: str
    path: str
    manifest_mpp: float | None
    first_seen: str
    last_seen: str
    last_run: int | None
    patches: int | None
    prediction: dict[str, Any] | None
    risk: float | None
    model_hash: str | None
    versions: dict[str, Any] | None


@dataclass(frozen=True)
class PathRow:
    """A path a slide was found at and the file signature seen there."""

    path: str
    slide_hash: str
    signature: str


@dataclass(frozen=True)
class RunRow:
    """One run."""

    run_id: int
    started: str
    finished: str | None
    state: str
    pid: int | None
    host: str | None
    command: str | None
    versions: dict[str, Any] | None
    summary: dict[str, Any] | None


class RunDatabase:
    """The run database of an output folder; see the module docstring."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    @classmethod
    def open(cls, folder: str | Path) -> RunDatabase:
        """Open (creating it if needed) for writing; only the lock holder does this."""
        path = Path(folder) / DATABASE_NAME
        connection = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.executescript(_SCHEMA)
        database = cls(connection, path)
        with database._write() as cursor:
            found = cursor.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if found is None:
                cursor.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                               (str(SCHEMA_VERSION),))
            elif int(found[0]) != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{path} has schema version {found[0]}, this slidepipe reads "
                    f"{SCHEMA_VERSION}; use a matching slidepipe or a new output folder")
        return database

    @classmethod
    def open_readonly(cls, folder: str | Path) -> RunDatabase:
        """Open for reading while a run may be writing (never takes the run lock)."""
        path = Path(folder) / DATABASE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: no slidepipe run has used "
                                    f"{folder} yet")
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0,
                                     isolation_level=None)
        return cls(connection, path)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One short write transaction."""
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    # -- runs ---------------------------------------------------------------------------------
    def begin_run(self, pid: int, host: str, command: str, config: dict[str, Any],
                  versions: dict[str, Any]) -> int:
        """Record a starting run; returns its id."""
        with self._write() as cursor:
            cursor.execute("INSERT INTO runs (started, state, pid, host, command, config, "
                           "versions) VALUES (?, 'running', ?, ?, ?, ?, ?)",
                           (now_iso(), pid, host, command, _json(config), _json(versions)))
            return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, state: str, summary: dict[str, Any],
                   versions: dict[str, Any] | None = None) -> None:
        """Record how a run ended (finished, stopped or failed), its summary and, when given,
        the versions it ran with (backbone weights and model included)."""
        with self._write() as cursor:
            cursor.execute("UPDATE runs SET finished=?, state=?, summary=?, "
                           "versions=COALESCE(?, versions) WHERE run_id=?",
                           (now_iso(), state, _json(summary), _json(versions), run_id))

    def recover_killed_runs(self) -> tuple[list[int], int]:
        """Mark runs left ``running`` as ``killed`` and their ``running`` stages ``pending``
        (call while holding the run lock); returns the run ids and the stage count."""
        with self._write() as cursor:
            runs = [r[0] for r in cursor.execute(
                "SELECT run_id FROM runs WHERE state='running'").fetchall()]
            cursor.execute("UPDATE runs SET state='killed', finished=? WHERE state='running'",
                           (now_iso(),))
            stages = cursor.execute(
                "UPDATE stages SET status='pending' WHERE status='running'").rowcount
        return runs, stages

    def failures_of(self, run_ids: Iterable[int]) -> int:
        """Slides failed or quarantined by the given runs (and not redone since)."""
        ids = list(run_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        return int(self.connection.execute(
            f"SELECT COUNT(DISTINCT slide_hash) FROM stages WHERE run_id IN ({marks}) AND "
            "status IN ('failed', 'quarantined')", ids).fetchone()[0])

    def runs(self, limit: int = 10) -> list[RunRow]:
        """The latest runs, newest first."""
        rows = self.connection.execute(
            "SELECT run_id, started, finished, state, pid, host, command, versions, summary "
            "FROM runs ORDER BY run_id DESC LIMIT ?", (limit,)).fetchall()
        return [RunRow(*row[:7], versions=_load(row[7]), summary=_load(row[8]))
                for row in rows]

    # -- slides and paths -----------------------------------------------------------------------
    def paths(self) -> dict[str, PathRow]:
        """Every known path with its slide and file signature."""
        return {row[0]: PathRow(*row) for row in self.connection.execute(
            "SELECT path, slide_hash, signature FROM slide_paths")}

    def slides(self) -> dict[str, SlideRow]:
        """Every known slide by content hash."""
        rows = self.connection.execute(
            "SELECT slide_hash, slide_id, path, manifest_mpp, first_seen, last_seen, last_run, "
            "patches, prediction, risk, model_hash, versions FROM slides").fetchall()
        return {row[0]: SlideRow(*row[:8], prediction=_load(row[8]), risk=row[9],
                                 model_hash=row[10], versions=_load(row[11])) for row in rows}

    def record_slides(self, slides: Iterable[tuple[str, str, str, float | None]],
                      paths: Iterable[tuple[str, str, str]]) -> None:
        """Upsert slides ``(hash, slide_id, path, manifest_mpp)`` and the paths they were found
        at ``(path, hash, signature)``, all in one transaction."""
        seen = now_iso()
        with self._write() as cursor:
            cursor.executemany(
                "INSERT INTO slides (slide_hash, slide_id, path, manifest_mpp, first_seen, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(slide_hash) DO UPDATE SET "
                "path=excluded.path, manifest_mpp=excluded.manifest_mpp, "
                "last_seen=excluded.last_seen",
                [(h, i, p, m, seen, seen) for h, i, p, m in slides])
            cursor.executemany(
                "INSERT INTO slide_paths (path, slide_hash, signature, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
                "slide_hash=excluded.slide_hash, signature=excluded.signature, "
                "last_seen=excluded.last_seen",
                [(p, h, s, seen, seen) for p, h, s in paths])

    def drop_unreadable(self, readable_paths: Iterable[str], prefix: str) -> int:
        """Forget the records of slides that could not be read (hash ``prefix…``) at paths
        that are readable now (they are known under their content hash instead)."""
        paths = list(readable_paths)
        with self._write() as cursor:
            doomed = [row[0] for path in paths for row in cursor.execute(
                "SELECT slide_hash FROM slides WHERE path=? AND slide_hash LIKE ?",
                (path, prefix + "%"))]
            for table in ("stages", "slide_paths", "slides"):
                cursor.executemany(f"DELETE FROM {table} WHERE slide_hash=?",
                                   [(h,) for h in doomed])
        return len(doomed)

    def record_prediction(self, slide_hash: str, prediction: dict[str, Any], risk: float,
                          model_hash: str) -> None:
        """Store a slide's prediction (grade, probabilities) and triage risk."""
        with self._write() as cursor:
            cursor.execute("UPDATE slides SET prediction=?, risk=?, model_hash=? "
                           "WHERE slide_hash=?", (_json(prediction), risk, model_hash,
                                                  slide_hash))

    def record_features(self, slide_hash: str, patches: int, versions: dict[str, Any],
                        run_id: int) -> None:
        """Store a slide's patch count and the versions its features were made with."""
        with self._write() as cursor:
            cursor.execute("UPDATE slides SET patches=?, versions=?, last_run=? "
                           "WHERE slide_hash=?", (patches, _json(versions), run_id, slide_hash))

    # -- stages -------------------------------------------------------------------------------
    def stages(self, run_id: int | None = None) -> dict[str, dict[str, StageRow]]:
        """Stage rows by slide hash and stage (only those of ``run_id`` when given)."""
        query = ("SELECT slide_hash, stage, status, key, run_id, attempts, started, finished, "
                 "seconds, error, traceback, detail FROM stages")
        rows = (self.connection.execute(query + " WHERE run_id=?", (run_id,)) if run_id
                else self.connection.execute(query)).fetchall()
        found: dict[str, dict[str, StageRow]] = {}
        for row in rows:
            found.setdefault(row[0], {})[row[1]] = StageRow(*row[:11],
                                                            detail=_load(row[11]) or {})
        return found

    def queue_stages(self, run_id: int, todo: Iterable[tuple[str, str, str]]) -> None:
        """Mark ``(hash, stage, key)`` pending for this run (one transaction)."""
        with self._write() as cursor:
            cursor.executemany(
                "INSERT INTO stages (slide_hash, stage, status, key, run_id) "
                "VALUES (?, ?, 'pending', ?, ?) ON CONFLICT(slide_hash, stage) DO UPDATE SET "
                "status='pending', key=excluded.key, run_id=excluded.run_id, error=NULL, "
                "traceback=NULL", [(h, s, k, run_id) for h, s, k in todo])

    def start_stage(self, slide_hash: str, stage: str) -> None:
        """A stage's work started."""
        with self._write() as cursor:
            cursor.execute("UPDATE stages SET status='running', started=?, finished=NULL, "
                           "attempts=attempts+1 WHERE slide_hash=? AND stage=?",
                           (now_iso(), slide_hash, stage))

    def end_stage(self, slide_hash: str, stage: str, status: str, *, seconds: float,
                  detail: dict[str, Any] | None = None, error: str | None = None,
                  traceback: str | None = None) -> None:
        """A stage ended: done, skipped, failed or quarantined."""
        with self._write() as cursor:
            cursor.execute("UPDATE stages SET status=?, finished=?, seconds=?, detail=?, "
                           "error=?, traceback=? WHERE slide_hash=? AND stage=?",
                           (status, now_iso(), round(seconds, 3), _json(detail), error,
                            traceback, slide_hash, stage))

    def requeue_stage(self, slide_hash: str, stage: str) -> None:
        """A stage was interrupted: pending again, for the next run."""
        with self._write() as cursor:
            cursor.execute("UPDATE stages SET status='pending', finished=NULL "
                           "WHERE slide_hash=? AND stage=?", (slide_hash, stage))

    def drop_pending(self, slide_hash: str, stages: Iterable[str]) -> None:
        """Forget queued stages that will not run (an earlier stage failed)."""
        with self._write() as cursor:
            cursor.executemany("DELETE FROM stages WHERE slide_hash=? AND stage=? AND "
                               "status='pending'", [(slide_hash, s) for s in stages])
