"""The batch commands of the ``slidepipe`` CLI: ``run`` (an archive, every night) and
``status`` (of a running or finished run).

Registered on the main application in :mod:`pipelines.cli`; they share its exit codes (0 all
done, 2 finished with failed slides, 1 fatal) and one-line errors.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from .backbones import BackboneError
from .cli_common import EXIT_OK, console, fatal
from .config import ConfigError
from .discovery import ManifestError
from .feature_store import FeatureStoreError
from .run.config import load_run_config
from .run.lock import RunLockedError
from .run.runner import run_archive
from .run.status import read_status, status_lines


def run(
    config_file: Annotated[Path, typer.Argument(help="run config (YAML): archive, model, out, "
                                                     "stages, run options, slidepipe sections")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="existing Dask scheduler, tcp://HOST:PORT (default: a LocalCluster)")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="process failed and quarantined slides again")] = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="only slides whose id, file name or path matches this shell pattern "
                       "(repeatable)")] = None,
    since: Annotated[str | None, typer.Option(
        help="only slides whose files changed at or after this date (2024-05-01)")] = None,
    max_runtime: Annotated[str | None, typer.Option(
        help="start no slide after this long, e.g. 8h; the next run continues")] = None,
    slide_timeout: Annotated[str | None, typer.Option(
        help="quarantine a slide whose tasks ran longer than this in all, e.g. 2h")] = None,
    notify: Annotated[str | None, typer.Option(
        help="shell command run at the end with the summary on stdin ({summary}: as an "
             "argument)")] = None,
) -> None:
    """Process an archive: tile, extract, predict and export every new or changed slide as one
    Dask graph, record it in OUT/run.db, and write report.json/report.html. Rerun it every
    night; it takes only new slides. Exit code 2 when slides failed, 1 when the run could not
    go on."""
    try:
        config = load_run_config(config_file, {
            "out": out.absolute() if out is not None else None,
            "cluster": {"scheduler": scheduler},
            "run": {"retry_failed": retry_failed or None, "only": only or None,
                    "since": since, "max_runtime": max_runtime,
                    "slide_timeout": slide_timeout, "notify": notify}})
        result = run_archive(config, command=" ".join(sys.argv), say=_say)
    except (ConfigError, ManifestError, BackboneError, RunLockedError, FeatureStoreError,
            sqlite3.DatabaseError, OSError) as error:
        raise fatal(error) from error
    _say(result.summary)
    raise typer.Exit(result.exit_code)


def _say(line: str) -> None:
    """Print a progress line as it is (slide names and errors are not markup)."""
    console.print(line, markup=False, highlight=False)


def status(
    out: Annotated[Path, typer.Argument(help="the output folder of slidepipe run")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show where a running or finished run stands (reads OUT/run.db; never waits for or
    disturbs the run)."""
    try:
        found = read_status(out)
    except (FileNotFoundError, sqlite3.DatabaseError) as error:
        raise fatal(error) from error
    if as_json:
        typer.echo(json.dumps(found, indent=2, default=str))
    else:
        for line in status_lines(found):
            typer.echo(line)
    raise typer.Exit(EXIT_OK)
