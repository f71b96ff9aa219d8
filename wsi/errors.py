"""Typed errors raised by the slide layer.

Every error names the file it concerns and says what the user can do about it, so the CLI can
print a single line and the run log keeps the traceback.
"""

from __future__ import annotations

from pathlib import Path


class SlideError(Exception):
    """Base class of every error about one slide; carries the slide's path."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class SlideOpenError(SlideError):
    """The file cannot be opened as a slide by any backend (corrupt, truncated, not a slide,
    unreadable, empty)."""


class MissingResolutionError(SlideError):
    """The slide carries no usable µm/px metadata and the user gave no override."""


class ImplausibleResolutionError(MissingResolutionError):
    """The slide's µm/px metadata is outside the plausible range for microscopy."""


class SlideReadError(SlideError):
    """Pixels could not be read from an opened slide (corrupt tile, truncated file)."""


class AnnotationError(SlideError):
    """An include/exclude annotation file cannot be used."""
