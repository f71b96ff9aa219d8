"""Heatmap scales: per-slide normalisation of raw scores to [0, 1] and perceptual colormaps.

- :func:`fit_normaliser` turns one slide's raw scores into [0, 1] (``percentile`` clip, ``rank``
  or ``absolute``) and says what it did in a legend; the fitted :class:`Normaliser` applies to
  other scores of the same slide too;
- :func:`colorize` applies a perceptually uniform colormap (:data:`PERCEPTUAL_COLORMAPS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from matplotlib import colormaps

Normalisation = Literal["percentile", "rank", "absolute"]

NORMALISATIONS: Final = ("percentile", "rank", "absolute")

#: Perceptually uniform sequential colormaps (lightness grows with the score), selectable by name.
PERCEPTUAL_COLORMAPS: Final = ("viridis", "magma", "inferno", "plasma", "cividis")


@dataclass(frozen=True)
class Normaliser:
    """A per-slide mapping of raw scores to [0, 1], fitted on the slide's own scores.

    It applies to other scores of the same slide too (finer patches of a refinement), so they
    land on the same scale. ``legend`` states what was done, for the figure and the summary.
    """

    method: Normalisation
    low: float
    high: float
    legend: str
    reference: np.ndarray = field(repr=False)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """``scores`` mapped to float32 values in [0, 1]."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "rank":
            n = self.reference.size
            if n < 2:
                return np.full(scores.shape, 0.5, dtype=np.float32)
            below = np.searchsorted(self.reference, scores, side="left")
            up_to = np.searchsorted(self.reference, scores, side="right")
            position = np.clip((below + up_to - 1) / 2.0, 0.0, n - 1)
            return (position / (n - 1)).astype(np.float32)
        if self.method == "percentile" and self.high <= self.low:
            return np.full(scores.shape, 0.5, dtype=np.float32)
        low, high = (self.low, self.high) if self.method == "percentile" else (0.0, 1.0)
        return np.clip((scores - low) / (high - low), 0.0, 1.0).astype(np.float32)


def fit_normaliser(scores: np.ndarray, method: Normalisation = "percentile",
                   percentiles: tuple[float, float] = (1.0, 99.0),
                   score_name: str = "attention") -> Normaliser:
    """Fit the per-slide normalisation ``method`` on a slide's raw ``scores``.

    ``percentile``: clip at the ``percentiles`` (e.g. 1st and 99th) and stretch to [0, 1];
    ``rank``: each patch's rank among the slide's patches, uniform on [0, 1] (ties share their
    mean rank); ``absolute``: the scores as they are (probabilities), clipped to [0, 1].
    Constant scores map to 0.5 under ``percentile`` and ``rank``.
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of "
                         f"{', '.join(NORMALISATIONS)}")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no scores to normalise (the slide has no patches)")
    if not np.isfinite(values).all():
        raise ValueError(f"{score_name} holds {int((~np.isfinite(values)).sum())} non-finite "
                         "values; re-run slidepipe predict")
    low_p, high_p = percentiles
    if not 0.0 <= low_p < high_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if method == "percentile":
        low, high = (float(v) for v in np.percentile(values, [low_p, high_p]))
        legend = (f"{score_name}, per-slide percentile normalisation: percentiles {low_p:g} to "
                  f"{high_p:g} ({low:.3g} to {high:.3g}) stretched to 0-1, clipped")
    elif method == "rank":
        low, high = float(values.min()), float(values.max())
        legend = (f"{score_name}, per-slide rank normalisation: rank among the slide's "
                  f"{values.size} patches, uniform on 0-1")
    else:
        low, high = 0.0, 1.0
        legend = f"{score_name} as stored (absolute scale, clipped to 0-1)"
    return Normaliser(method=method, low=low, high=high, legend=legend,
                      reference=np.sort(values))


def normalise(scores: np.ndarray, method: Normalisation = "percentile",
              percentiles: tuple[float, float] = (1.0, 99.0),
              score_name: str = "attention") -> tuple[np.ndarray, str]:
    """One slide's ``scores`` normalised to float32 [0, 1], and the legend saying how."""
    normaliser = fit_normaliser(scores, method, percentiles, score_name)
    return normaliser(scores), normaliser.legend


def check_colormap(name: str) -> str:
    """``name`` when it is one of :data:`PERCEPTUAL_COLORMAPS`; ValueError otherwise."""
    if name not in PERCEPTUAL_COLORMAPS:
        raise ValueError(f"colormap {name!r} is not offered: heatmaps use perceptually uniform "
                         f"colormaps, one of {', '.join(PERCEPTUAL_COLORMAPS)}")
    return name


def colormap_lut(name: str) -> np.ndarray:
    """(256, 4) uint8 RGBA table of a perceptual colormap (index = round(score x 255))."""
    table = colormaps[check_colormap(name)](np.linspace(0.0, 1.0, 256))
    return np.rint(table * 255).astype(np.uint8)


def colorize(values: np.ndarray, colormap: str = "viridis") -> np.ndarray:
    """Scores in [0, 1] as uint8 RGBA (H, W, 4); NaN is fully transparent."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    index = np.rint(np.clip(np.where(finite, values, 0.0), 0.0, 1.0) * 255).astype(np.uint8)
    rgba = colormap_lut(colormap)[index]
    rgba[~finite] = 0
    return rgba
