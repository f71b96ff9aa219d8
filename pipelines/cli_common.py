"""What every ``slidepipe`` command shares: the console, exit codes and one-line errors.

Exit codes: 0 all done, 2 finished but some slides failed, 1 fatal (bad config, no input,
unwritable output). Errors print as one line; tracebacks go to the run log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
EXIT_OK, EXIT_FATAL, EXIT_SLIDES_FAILED = 0, 1, 2


def fatal(message: object) -> typer.Exit:
    """Print ``message`` as one error line and return the exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(EXIT_FATAL)


@contextmanager
def log_to(path: Path) -> Iterator[Path]:
    """Log everything (with tracebacks) to ``path`` while a command runs; the console stays
    one line per problem. Yields ``path``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
