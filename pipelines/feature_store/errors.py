"""Errors raised by the feature store; each message names the store and says what to do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


class FeatureStoreError(RuntimeError):
    """A feature store cannot be used as asked (missing, foreign, replaced, misused)."""


def _abbreviate(indices: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", … ({len(indices) - limit} more)" if len(indices) > limit else "")


class IncompleteStoreError(FeatureStoreError):
    """The store has no valid completion marker: a run was stopped before it finished.

    ``pending`` lists the chunks that still lack a completion marker.
    """

    def __init__(self, path: str | Path, pending: Sequence[int], num_chunks: int) -> None:
        self.path = Path(path)
        self.pending = list(pending)
        self.num_chunks = num_chunks
        done = num_chunks - len(self.pending)
        if self.pending:
            detail = (f"{done} of {num_chunks} chunks written, missing: "
                      f"{_abbreviate(self.pending)}")
        else:
            detail = f"all {num_chunks} chunks written but the store was never finalized"
        super().__init__(
            f"feature store {self.path} is incomplete ({detail}); rerun feature extraction "
            "for this slide to resume it (written chunks are kept)")


class CorruptStoreError(FeatureStoreError):
    """Chunks whose bytes do not decode or do not match their recorded checksum.

    ``problems`` maps each bad chunk index to a description (rows, file, cause).
    ``markers_removed`` tells whether their completion markers were already deleted, so that
    the next run recomputes exactly those chunks.
    """

    def __init__(self, path: str | Path, problems: Mapping[int, str], *,
                 markers_removed: bool) -> None:
        self.path = Path(path)
        self.problems = dict(sorted(problems.items()))
        self.markers_removed = markers_removed
        listing = "; ".join(f"chunk {index}: {text}" for index, text in self.problems.items())
        if markers_removed:
            action = ("their completion markers were removed: rerun feature extraction for this "
                      "slide to recompute only these chunks")
        else:
            action = ("rerun feature extraction for this slide (it re-verifies the store and "
                      "recomputes only these chunks)")
        super().__init__(
            f"feature store {self.path} has {len(self.problems)} corrupt chunk(s) — {listing}. "
            f"Fix: {action}, or rerun with --overwrite to rebuild the store from scratch")
