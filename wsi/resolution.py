"""Resolution handling: µm/px from metadata, user overrides, magnification aliases, and the
choice of pyramid level for a target resolution."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import SlideError

#: Microscopy scanners report between ~0.1 µm/px (100x oil) and ~10 µm/px (1.25x overviews);
#: values outside this range are almost always a default DPI written by generic software.
PLAUSIBLE_MPP = (0.05, 20.0)

_CM_PER_UNIT = {"centimeter": 1.0, "cm": 1.0, "inch": 2.54, "millimeter": 0.1, "mm": 0.1}


class ResolutionUnavailableError(SlideError):
    """The slide cannot provide the requested resolution (it would need upsampling)."""


def magnification_to_mpp(magnification: float) -> float:
    """Map an objective magnification to µm/px by the convention 10x = 1 µm/px (20x = 0.5)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


def mpp_from_properties(properties: Mapping[str, str]) -> tuple[float, float] | None:
    """Read µm/px (x, y) from backend properties; ``None`` when the slide does not say.

    Looks at the normalised keys of OpenSlide and tiffslide first, then at the raw TIFF
    resolution tags (generic TIFFs that only carry XResolution/ResolutionUnit).
    """
    for prefix in ("openslide", "tiffslide"):
        x, y = properties.get(f"{prefix}.mpp-x"), properties.get(f"{prefix}.mpp-y")
        if x not in (None, "", "None"):
            mpp_x = float(x)
            mpp_y = float(y) if y not in (None, "", "None") else mpp_x
            return mpp_x, mpp_y
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    x_res, y_res = properties.get("tiff.XResolution"), properties.get("tiff.YResolution")
    if unit in _CM_PER_UNIT and x_res:
        cm = _CM_PER_UNIT[unit]
        mpp_x = cm * 1e4 / float(x_res)
        mpp_y = cm * 1e4 / float(y_res) if y_res else mpp_x
        return mpp_x, mpp_y
    return None


def is_plausible_mpp(mpp: float) -> bool:
    """True when ``mpp`` lies inside :data:`PLAUSIBLE_MPP`."""
    return PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def load_mpp_overrides(csv_path: str | Path) -> dict[str, float]:
    """Read a per-slide override table with columns ``slide`` and ``mpp``.

    ``slide`` may be a file name, a stem or a full path; :func:`lookup_mpp_override` matches
    any of them.
    """
    overrides: dict[str, float] = {}
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"slide", "mpp"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: an mpp override CSV needs the columns 'slide' and 'mpp'")
        for row_number, row in enumerate(reader, start=2):
            try:
                mpp = float(row["mpp"])
            except ValueError as error:
                raise ValueError(f"{csv_path}, line {row_number}: mpp {row['mpp']!r} "
                                 "is not a number") from error
            if not is_plausible_mpp(mpp):
                raise ValueError(f"{csv_path}, line {row_number}: mpp {mpp} is outside "
                                 f"the plausible range {PLAUSIBLE_MPP}")
            overrides[row["slide"].strip()] = mpp
    return overrides


def lookup_mpp_override(overrides: Mapping[str, float], path: str | Path) -> float | None:
    """Find the override for ``path`` by full path, file name or stem."""
    path = Path(path)
    for key in (str(path), path.name, path.stem):
        if key in overrides:
            return overrides[key]
    return None


def best_level_for_downsample(level_downsamples: Sequence[float], downsample: float,
                              tolerance: float) -> int:
    """The coarsest level whose downsample is at most ``downsample`` (within ``tolerance``).

    Reading from it and shrinking never upsamples beyond the tolerance.
    """
    best = 0
    for level, level_downsample in enumerate(level_downsamples):
        if level_downsample <= downsample * (1.0 + tolerance):
            best = level if level_downsample >= level_downsamples[best] else best
    return best
