"""A run's logs: ``OUT/logs/run-<id>.log`` for people and ``OUT/logs/run-<id>.jsonl`` for
machines (one JSON object per line: time, level, logger, message, and for run events the event
name and its fields: slide, stage, status, seconds…), plus one traceback file per failure under
``OUT/logs/tracebacks/``. Both logs are appended line by line and flushed, so a killed run
leaves every line written so far."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import TracebackType
from typing import Any

from wsi.atomic import write_text_atomic

LOGS_DIR = "logs"
EVENTS_LOGGER = "slidepipe.run.events"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

events_log = logging.getLogger(EVENTS_LOGGER)


class _JsonLinesHandler(logging.Handler):
    """Writes each record as one JSON line."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line: dict[str, Any] = {"time": self.formatter.formatTime(record) if self.formatter
                                    else record.created, "level": record.levelname,
                                    "logger": record.name, "message": record.getMessage()}
            event = getattr(record, "event", None)
            if event is not None:
                line["event"] = event
                line.update(getattr(record, "fields", {}))
            if record.exc_info:
                line["traceback"] = logging.Formatter().formatException(record.exc_info)
            self.stream.write(json.dumps(line, default=str) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.stream.close()
        super().close()


class RunLogs:
    """Attach the run's two log files to the root logger for the ``with`` block."""

    def __init__(self, out: Path, run_id: int) -> None:
        self.folder = out / LOGS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.human = self.folder / f"run-{run_id:05d}.log"
        self.json_lines = self.folder / f"run-{run_id:05d}.jsonl"
        self.run_id = run_id
        self._handlers: list[logging.Handler] = []
        self._previous_level = logging.NOTSET

    def __enter__(self) -> RunLogs:
        human = logging.FileHandler(self.human, encoding="utf-8")
        human.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        machine = _JsonLinesHandler(self.json_lines)
        machine.setFormatter(logging.Formatter("%(asctime)s"))
        root = logging.getLogger()
        self._previous_level = root.level
        root.setLevel(logging.INFO)
        for handler in (human, machine):
            root.addHandler(handler)
            self._handlers.append(handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self._previous_level)

    def traceback_file(self, slide_id: str, stage: str, text: str) -> str:
        """Write a failure's traceback; returns its path relative to the output folder."""
        name = f"run-{self.run_id:05d}-{_UNSAFE.sub('_', slide_id)}-{stage}.txt"
        path = self.folder / "tracebacks" / name
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, text)
        return f"{LOGS_DIR}/tracebacks/{name}"


def event(name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a run event: ``message`` in the human log, ``name`` and ``fields`` in the JSON."""
    events_log.log(level, message, extra={"event": name, "fields": fields})
