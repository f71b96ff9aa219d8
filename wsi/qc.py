"""Pixel-level quality control of patches: near-white background, blur, marker ink.

Each measure is a per-patch number that a grid stores beside its coordinates
(``TileGrid.measurements``) and that :class:`PatchQCSettings` turns into a filter.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi

from .tissue import hsv_saturation_value, pen_mark_mask


class PatchQCSettings(BaseModel):
    """Optional pixel QC (the ``qc:`` section): measured when ``enabled``, filtered by the
    thresholds that are set."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="read every patch once and measure it")
    max_white_fraction: float | None = Field(
        None, ge=0, le=1, description="drop patches with more near-white background than this")
    min_blur_score: float | None = Field(
        None, ge=0, description="drop patches whose Laplacian variance is below this (blurred)")
    max_pen_pixel_fraction: float | None = Field(
        None, ge=0, le=1, description="drop patches with more marker-ink pixels than this")


def white_fraction(batch: np.ndarray, min_value: float = 0.85, max_saturation: float = 0.08
                   ) -> np.ndarray:
    """Fraction of bright, unsaturated (glass) pixels per patch of a (B, H, W, 3) batch."""
    out = np.empty(len(batch), dtype=np.float32)
    for i, patch in enumerate(batch):
        saturation, value = hsv_saturation_value(patch)
        out[i] = np.mean((value >= min_value) & (saturation <= max_saturation))
    return out


def blur_score(batch: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of the grey image per patch: low values mean out of focus."""
    out = np.empty(len(batch), dtype=np.float32)
    for i, patch in enumerate(batch):
        grey = patch.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out[i] = float(ndi.laplace(grey).var())
    return out


def pen_pixel_fraction(batch: np.ndarray) -> np.ndarray:
    """Fraction of marker-ink coloured pixels per patch."""
    return np.array([pen_mark_mask(patch).mean() for patch in batch], dtype=np.float32)


def measure_patches(batch: np.ndarray) -> dict[str, np.ndarray]:
    """All pixel QC measures of a batch, keyed by measurement name."""
    return {"white_fraction": white_fraction(batch), "blur_score": blur_score(batch),
            "pen_pixel_fraction": pen_pixel_fraction(batch)}


def qc_keep(measurements: dict[str, np.ndarray], settings: PatchQCSettings) -> np.ndarray:
    """Boolean mask of patches passing every QC threshold that is set."""
    count = len(next(iter(measurements.values())))
    keep = np.ones(count, dtype=bool)
    if settings.max_white_fraction is not None:
        keep &= measurements["white_fraction"] <= settings.max_white_fraction
    if settings.min_blur_score is not None:
        keep &= measurements["blur_score"] >= settings.min_blur_score
    if settings.max_pen_pixel_fraction is not None:
        keep &= measurements["pen_pixel_fraction"] <= settings.max_pen_pixel_fraction
    return keep
