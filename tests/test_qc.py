"""Pixel QC measures react to what they are named after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import wsi
from wsi import qc


def _real_patches(real_svs: Path) -> np.ndarray:
    slide = wsi.open_slide(real_svs)
    spec = wsi.plan_grid(slide, wsi.GridSettings())
    coords = np.array([[1024, 1792], [768, 2304]], dtype=np.int64)  # inside the tissue
    with wsi.PatchReader(slide, spec) as reader:
        return reader.read_batch(coords)


def test_blur_lowers_the_blur_score(real_svs: Path) -> None:
    sharp = _real_patches(real_svs)
    blurred = np.stack([ndi.gaussian_filter(p, sigma=(3, 3, 0)) for p in sharp])
    assert (qc.blur_score(blurred) < 0.2 * qc.blur_score(sharp)).all()


def test_white_and_pen_fractions(real_svs: Path) -> None:
    tissue = _real_patches(real_svs)
    glass = np.full((1, 256, 256, 3), 246, dtype=np.uint8)
    inked = tissue[:1].copy()
    inked[0, :, :128] = (30, 90, 200)  # blue marker over half the patch
    assert qc.white_fraction(glass)[0] > 0.99 and (qc.white_fraction(tissue) < 0.6).all()
    assert qc.pen_pixel_fraction(inked)[0] > 0.45
    assert (qc.pen_pixel_fraction(tissue) < 0.05).all()


def test_qc_keep_applies_only_the_thresholds_that_are_set() -> None:
    measurements = {"white_fraction": np.array([0.1, 0.9, 0.2]),
                    "blur_score": np.array([500.0, 500.0, 5.0]),
                    "pen_pixel_fraction": np.array([0.0, 0.0, 0.0])}
    assert qc.qc_keep(measurements, wsi.PatchQCSettings()).all()
    keep = qc.qc_keep(measurements, wsi.PatchQCSettings(max_white_fraction=0.5,
                                                          min_blur_score=50))
    assert keep.tolist() == [True, False, False]
