"""The notification at the end of a run: a shell command given the one-line summary.

The summary is written to the command's stdin (``mail -s slidepipe it@example.org`` reads its
body there), and ``{summary}`` in the command is replaced by the summary quoted for the shell
(``notify-send slidepipe {summary}``). The command also finds ``SLIDEPIPE_SUMMARY``,
``SLIDEPIPE_EXIT_CODE`` and ``SLIDEPIPE_REPORT`` in its environment. A failing or hanging
command is logged; it never changes the run's exit code.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT_S = 120.0


def notify(command: str, summary: str, exit_code: int, report: Path | None) -> str | None:
    """Run the notification command; returns a problem to show, or None when it worked."""
    shell_command = command.replace("{summary}", shlex.quote(summary))
    environment = {**os.environ, "SLIDEPIPE_SUMMARY": summary,
                   "SLIDEPIPE_EXIT_CODE": str(exit_code),
                   "SLIDEPIPE_REPORT": str(report) if report else ""}
    try:
        completed = subprocess.run(shell_command, shell=True, input=summary + "\n", text=True,
                                   capture_output=True, env=environment,
                                   timeout=NOTIFY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        problem = f"the notification command did not finish in {NOTIFY_TIMEOUT_S:.0f} s"
        log.warning("%s: %s", problem, command)
        return problem
    if completed.returncode != 0:
        problem = (f"the notification command exited with {completed.returncode}: "
                   f"{completed.stderr.strip()[:300]}")
        log.warning("%s (%s)", problem, command)
        return problem
    log.info("notification sent: %s", command)
    return None
