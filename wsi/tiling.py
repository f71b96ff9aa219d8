"""Tile grids: the level-0 coordinates of every patch that holds enough tissue.

The grid is computed on the tissue mask with a summed-area table, so the tissue fraction of
every candidate patch costs four look-ups and the whole grid is a handful of numpy operations
(no per-patch polygon tests in Python). Patches start at level-0 origin (0, 0) and step by the
patch stride, so at a native pyramid level and a patch size that is a multiple of the stored
tile size, every patch is exactly a set of stored tiles (see docs/adr/0002-tile-aligned-grids.md).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .resolution import ResolutionUnavailableError, magnification_to_mpp
from .slide import Slide
from .tissue import TissueMask

log = logging.getLogger(__name__)


class GridSettings(BaseModel):
    """Parameters of the patch grid (the ``tiling:`` section of a config)."""

    model_config = ConfigDict(extra="forbid")

    target_mpp: float | None = Field(0.5, gt=0, description="µm/px of the patches (0.5 ≈ 20x)")
    magnification: float | None = Field(
        None, gt=0, description="alias for target_mpp (20 → 0.5 µm/px); overrides it")
    mpp_tolerance: float = Field(
        0.05, ge=0, lt=0.5, description="relative mpp difference treated as the same resolution")
    patch_size: int = Field(256, ge=16, description="patch width and height at target_mpp, px")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring patches, px")
    min_tissue_fraction: float = Field(
        0.1, ge=0, le=1, description="keep patches with at least this fraction of tissue")
    max_pen_fraction: float | None = Field(
        None, ge=0, le=1, description="drop patches with more marker ink than this (QC filter)")

    @model_validator(mode="after")
    def _check(self) -> GridSettings:
        if self.overlap >= self.patch_size:
            raise ValueError("overlap must be smaller than patch_size")
        if self.target_mpp is None and self.magnification is None:
            raise ValueError("give target_mpp or magnification")
        return self

    @property
    def resolved_mpp(self) -> float:
        """The target µm/px, from the magnification alias when one is given."""
        if self.magnification is not None:
            return magnification_to_mpp(self.magnification)
        assert self.target_mpp is not None
        return self.target_mpp


@dataclass(frozen=True)
class GridSpec:
    """How a grid maps to the slide: where to read and how large, in level-0 and level pixels."""

    target_mpp: float
    patch_size: int
    overlap: int
    level0_mpp: float
    level: int
    level_downsample: float
    read_size: int
    patch_size_level0: int
    step_level0: int

    @property
    def effective_mpp(self) -> float:
        """The µm/px actually delivered (differs from target_mpp within the tolerance)."""
        return self.level0_mpp * self.patch_size_level0 / self.patch_size

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_mpp": self.target_mpp, "effective_mpp": self.effective_mpp,
            "patch_size": self.patch_size, "overlap": self.overlap,
            "level0_mpp": self.level0_mpp, "patch_level": self.level,
            "level_downsample": self.level_downsample, "read_size": self.read_size,
            "patch_size_level0": self.patch_size_level0, "step_level0": self.step_level0,
        }


def plan_grid(slide: Slide, settings: GridSettings) -> GridSpec:
    """Choose the pyramid level and the read size for ``settings`` on ``slide``.

    Within ``mpp_tolerance`` of a stored level the patches are read at that level unresized;
    otherwise they are read from the next finer level and shrunk. A target finer than level 0
    is refused (it would need upsampling).
    """
    target = settings.resolved_mpp
    level0_mpp = slide.level0_mpp
    scale = target / level0_mpp
    tolerance = settings.mpp_tolerance
    if scale < 1.0 / (1.0 + tolerance):
        raise ResolutionUnavailableError(
            slide.path, f"target {target:g} µm/px is finer than the slide's level 0 "
            f"({level0_mpp:g} µm/px); choose target_mpp >= {level0_mpp:.3g}")
    level = slide.best_level(scale, tolerance)
    level_downsample = slide.level_downsamples[level]
    if abs(level_downsample / scale - 1.0) <= tolerance:
        scale = level_downsample
        read_size = settings.patch_size
    else:
        read_size = round(settings.patch_size * scale / level_downsample)
    return GridSpec(
        target_mpp=target, patch_size=settings.patch_size, overlap=settings.overlap,
        level0_mpp=level0_mpp, level=level, level_downsample=level_downsample,
        read_size=read_size, patch_size_level0=round(settings.patch_size * scale),
        step_level0=round((settings.patch_size - settings.overlap) * scale),
    )


@dataclass
class TileGrid:
    """Patches of one slide: level-0 top-left ``coords`` (N, 2) int64 as (x, y), row-major,
    with per-patch ``measurements`` (N,) such as ``tissue_fraction``, ``pen_fraction`` and,
    after pixel QC, ``white_fraction`` and ``blur_score``."""

    coords: np.ndarray
    measurements: dict[str, np.ndarray]
    spec: GridSpec
    level0_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def tissue_fraction(self) -> np.ndarray:
        return self.measurements["tissue_fraction"]

    def select(self, keep: np.ndarray) -> TileGrid:
        """A grid with only the patches where ``keep`` is true (order preserved)."""
        return TileGrid(self.coords[keep], {k: v[keep] for k, v in self.measurements.items()},
                        self.spec, self.level0_size)

    def with_measurements(self, extra: dict[str, np.ndarray]) -> TileGrid:
        """A grid with ``extra`` per-patch measurements added."""
        for name, values in extra.items():
            if len(values) != len(self):
                raise ValueError(f"measurement {name!r} has {len(values)} values for "
                                 f"{len(self)} patches")
        return TileGrid(self.coords, {**self.measurements, **extra}, self.spec, self.level0_size)


def _band_sums(values: np.ndarray, starts: np.ndarray, stops: np.ndarray, axis: int
               ) -> np.ndarray:
    """Sums of ``values`` over the index ranges [start, stop) along ``axis`` (ranges may
    overlap or be empty): sums of the segments between sorted range boundaries (one pass over
    the data), then a short cumulative sum over those segments."""
    length = values.shape[axis]
    edges = np.unique(np.concatenate([[0], starts, stops]))
    edges = edges[edges < length]
    bounds = np.append(edges, length)
    data = values.view(np.uint8) if values.dtype == bool else values
    segments = np.stack([data[a:b].sum(axis=0, dtype=np.int32) if axis == 0 else
                         data[:, a:b].sum(axis=1, dtype=np.int64)
                         for a, b in itertools.pairwise(bounds)], axis=axis)
    shape = list(segments.shape)
    shape[axis] += 1
    cumulative = np.zeros(shape, dtype=np.int64)
    np.cumsum(segments, axis=axis, out=cumulative[1:] if axis == 0 else cumulative[:, 1:])
    first, last = np.searchsorted(bounds, starts), np.searchsorted(bounds, stops)
    return np.take(cumulative, last, axis=axis) - np.take(cumulative, first, axis=axis)


def _box_fractions(mask: np.ndarray, downsample: tuple[float, float], xs: np.ndarray,
                   ys: np.ndarray, size_level0: int) -> np.ndarray:
    """Fraction of true mask pixels inside every patch box (len(ys), len(xs)); parts of a box
    outside the slide count as false.

    Sums come in two separable passes: the mask summed over each row band of patches, then
    each band summed over each column band.
    """
    x0 = np.round(xs / downsample[0]).astype(np.int64)
    x1 = np.maximum(np.round((xs + size_level0) / downsample[0]).astype(np.int64), x0 + 1)
    y0 = np.round(ys / downsample[1]).astype(np.int64)
    y1 = np.maximum(np.round((ys + size_level0) / downsample[1]).astype(np.int64), y0 + 1)
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    if not mask.any():
        return np.zeros(area.shape, dtype=np.float32)
    rows = _band_sums(mask, np.clip(y0, 0, mask.shape[0]), np.clip(y1, 0, mask.shape[0]), 0)
    inside = _band_sums(rows, np.clip(x0, 0, mask.shape[1]), np.clip(x1, 0, mask.shape[1]), 1)
    return (inside / area).astype(np.float32)


def build_grid(tissue: TissueMask, spec: GridSpec, settings: GridSettings) -> TileGrid:
    """Every patch whose tissue fraction reaches ``settings.min_tissue_fraction`` (and passes the
    QC filters), in row-major order. An empty grid is logged as a warning, never hidden."""
    width0, height0 = tissue.level0_size
    xs = np.arange(0, width0, spec.step_level0, dtype=np.int64)
    ys = np.arange(0, height0, spec.step_level0, dtype=np.int64)
    tissue_fraction = _box_fractions(tissue.mask, tissue.downsample, xs, ys,
                                     spec.patch_size_level0)
    pen_fraction = _box_fractions(tissue.pen, tissue.downsample, xs, ys, spec.patch_size_level0)
    keep = tissue_fraction >= max(settings.min_tissue_fraction, 1e-6)
    if settings.max_pen_fraction is not None:
        keep &= pen_fraction <= settings.max_pen_fraction
    rows, cols = np.nonzero(keep)
    coords = np.column_stack([xs[cols], ys[rows]]).astype(np.int64)
    grid = TileGrid(coords=coords.reshape(-1, 2),
                    measurements={"tissue_fraction": tissue_fraction[rows, cols],
                                  "pen_fraction": pen_fraction[rows, cols]},
                    spec=spec, level0_size=tissue.level0_size)
    if len(grid) == 0:
        log.warning("no patch reaches a tissue fraction of %.2f", settings.min_tissue_fraction)
    return grid
