"""What the HTML export is given for one slide: :class:`SlideView` and its :class:`TopPatch` list.

A view is checked when it is made, so a caller's mistake (a heatmap of the wrong type or range,
a probability outside [0, 1]) fails at once, before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Scores may exceed [0, 1] by this much (float rounding of a normalisation) and are clipped.
SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class TopPatch:
    """One of a slide's highest-scoring patches: level-0 top-left (x, y), level-0 side ``size``,
    its heatmap ``score`` and its ``rank`` (1 = highest)."""

    x: int
    y: int
    size: int
    score: float
    rank: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"top patch #{self.rank}: size must be positive, got {self.size}")
        if self.rank < 1:
            raise ValueError(f"top patch at ({self.x}, {self.y}): rank starts at 1, "
                             f"got {self.rank}")
        if not math.isfinite(self.score):
            raise ValueError(f"top patch #{self.rank}: score must be finite, got {self.score}")


@dataclass(frozen=True)
class SlideView:
    """Everything the export shows about one slide.

    Attributes:
        slide_id: The name shown in the pages (pseudonymise it before, when asked to); the
            slide's path and file name never appear in the export.
        slide_path: The slide file (or DICOM-WSI folder); only its pyramid pixels are read.
        grade: The predicted grade (class name).
        risk: The triage score the worklist is sorted by, highest first.
        probabilities: Predicted probability per grade.
        qc_status: The slide's QC verdict as shown in the worklist (e.g. ``ok``, ``pen marks``).
        heatmap: float32 (H, W) scores in [0, 1], NaN where no patch was scored; it covers the
            slide's level-0 extent from (0, 0), one raster pixel per ``heatmap_downsample``
            level-0 pixels.
        heatmap_downsample: Level-0 pixels per raster pixel.
        legend: What the heatmap shows (e.g. "attention, min-max normalised").
        top_patches: The highest-scoring patches, listed in the viewer by rank.
        mpp: µm/px of level 0 when the slide has no resolution metadata (else ``None``).
    """

    slide_id: str
    slide_path: str | Path
    grade: str
    risk: float
    probabilities: dict[str, float]
    qc_status: str
    heatmap: np.ndarray
    heatmap_downsample: float
    legend: str
    top_patches: list[TopPatch] = field(default_factory=list)
    mpp: float | None = None

    def __post_init__(self) -> None:
        name = self.slide_id
        if not name.strip():
            raise ValueError("slide_id (the display name) must not be empty")
        if not math.isfinite(self.risk):
            raise ValueError(f"slide {name}: risk must be finite, got {self.risk}")
        for grade, probability in self.probabilities.items():
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"slide {name}: probability of {grade!r} is {probability}, "
                                 "outside [0, 1]")
        heatmap = self.heatmap
        if not isinstance(heatmap, np.ndarray) or heatmap.dtype != np.float32 \
                or heatmap.ndim != 2 or 0 in heatmap.shape:
            raise ValueError(f"slide {name}: heatmap must be a non-empty float32 (H, W) array, "
                             f"got {getattr(heatmap, 'dtype', type(heatmap))} "
                             f"{getattr(heatmap, 'shape', '')}")
        finite = heatmap[np.isfinite(heatmap)]
        if finite.size and (finite.min() < -SCORE_TOLERANCE or
                            finite.max() > 1 + SCORE_TOLERANCE):
            raise ValueError(f"slide {name}: heatmap scores span [{finite.min():.4g}, "
                             f"{finite.max():.4g}]; normalise them to [0, 1] first")
        if np.isinf(heatmap).any():
            raise ValueError(f"slide {name}: heatmap holds infinities; use NaN for no data")
        if not self.heatmap_downsample > 0:
            raise ValueError(f"slide {name}: heatmap_downsample must be positive, "
                             f"got {self.heatmap_downsample}")

    @property
    def grade_probability(self) -> float | None:
        """The probability of the predicted grade (the highest one when it is not listed)."""
        if self.grade in self.probabilities:
            return self.probabilities[self.grade]
        return max(self.probabilities.values(), default=None)

    def ranked_patches(self) -> list[TopPatch]:
        """The top patches by rank."""
        return sorted(self.top_patches, key=lambda patch: patch.rank)
