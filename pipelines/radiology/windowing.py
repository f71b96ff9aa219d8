"""Greyscale to display: CT window presets, the file's own window / VOI LUT, and per-modality
normalisation, all to uint8 (0 = darkest) for the backbone and the exports.

Presets are (centre, width) in Hounsfield units, the values radiology departments commonly
use. Windowing follows the linear function of DICOM PS3.3 C.11.2.1.2.1 (the one pydicom's
``apply_windowing`` implements).
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np

from .volume import Volume

#: CT window presets: name → (centre, width) in HU.
PRESETS: Final[dict[str, tuple[float, float]]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "abdomen": (40.0, 400.0),
}

#: Display modes besides the presets: ``auto`` (per modality, see :func:`resolve_window`),
#: ``file`` (the file's VOI LUT or window), ``percentile`` (0.5–99.5 % of the study mapped to
#: 0–255, the per-modality normalisation of MR, US and NIfTI) and ``minmax``.
MODES: Final = ("auto", "file", "percentile", "minmax")
WINDOW_NAMES: Final = (*MODES, *PRESETS)
Window = Literal["auto", "file", "percentile", "minmax", "brain", "subdural", "lung",
                 "mediastinum", "bone", "abdomen"]

PERCENTILES: Final = (0.5, 99.5)


def check_window(name: str) -> str:
    """``name`` when it is a preset or a mode; ValueError naming the choices otherwise."""
    if name not in WINDOW_NAMES:
        raise ValueError(f"unknown window {name!r}; choose one of {', '.join(WINDOW_NAMES)}")
    return name


def resolve_window(volume: Volume, name: str) -> str:
    """The concrete display of ``auto``: CT → the file's window, else the ``abdomen`` preset;
    CR/DX/MG → the file's VOI LUT or window, else ``percentile``; anything else (MR, US, PET,
    NIfTI) → ``percentile``. ``file`` without a window in the file also falls back to
    ``percentile``."""
    check_window(name)
    has_file = volume.window is not None or volume.voi_lut is not None
    if name == "auto":
        if volume.modality == "CT":
            return "file" if has_file else "abdomen"
        if volume.modality in {"CR", "DX", "MG"} and has_file:
            return "file"
        return "percentile"
    if name == "file" and not has_file:
        return "percentile"
    return name


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM linear windowing of ``values`` to uint8."""
    width = max(float(width), 1.0)
    low = centre - 0.5 - (width - 1.0) / 2.0
    scaled = ((values - (centre - 0.5)) / (width - 1.0) + 0.5) * 255.0
    out = np.where(values <= low, 0.0, np.clip(scaled, 0.0, 255.0))
    return np.round(out).astype(np.uint8)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = max(high - low, 1e-6)
    return np.round(np.clip((values - low) / span, 0.0, 1.0) * 255.0).astype(np.uint8)


def _fitted_range(volume: Volume, mode: str) -> tuple[float, float]:
    """(low, high) of ``percentile`` or ``minmax`` over the study (every slice on one scale)."""
    sample = volume.array[:: max(1, volume.num_slices // 64)]
    if mode == "minmax":
        return float(sample.min()), float(sample.max())
    low, high = np.percentile(sample, PERCENTILES)
    return float(low), float(high)


def to_uint8(volume: Volume, values: np.ndarray, name: str) -> np.ndarray:
    """Greyscale ``values`` of ``volume`` (any shape) as uint8 with the display ``name``.

    The range of ``percentile``/``minmax`` is fitted on the whole study, so every slice of a
    volume is displayed on the same scale.
    """
    mode = resolve_window(volume, name)
    if mode == "file" and volume.voi_lut is not None:
        return np.round(volume.voi_lut.apply(values) * 255.0).astype(np.uint8)
    if mode in PRESETS or mode == "file":
        centre, width = PRESETS.get(mode) or volume.window or (0.0, 1.0)
        return apply_window(values, centre, width)
    return _stretch(values, *_fitted_range(volume, mode))
