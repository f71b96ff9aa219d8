"""Tissue detection at low resolution: Otsu on HSV saturation, median blur, closing, hole
filling and a minimum area, all in physical units so biopsies and resections behave alike.

The median blur is applied as a majority vote on the thresholded mask. For a fixed threshold
``t``, ``median(window) > t`` holds exactly when most of the window exceeds ``t``, so the result
is identical to blurring the saturation first, at a fraction of the cost (a box sum instead of
a sort per pixel). The Otsu threshold is taken on the saturation histogram of the slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage import draw, filters, measure

from .geojson import polygons_to_feature_collection, read_polygons
from .slide import Slide


class TissueSettings(BaseModel):
    """Parameters of tissue detection (the ``tissue:`` section of a config)."""

    model_config = ConfigDict(extra="forbid")

    mask_mpp: float = Field(8.0, gt=0, description="µm/px of the mask (8 ≈ 1.25x)")
    min_saturation: float = Field(
        0.05, ge=0, le=1, description="floor under the Otsu threshold, so blank glass stays empty")
    saturation_threshold: float | None = Field(
        None, ge=0, le=1, description="fixed threshold instead of Otsu (0-1)")
    min_value: float = Field(
        0.08, ge=0, le=1, description="pixels darker than this (scanner borders) are not tissue")
    median_size: int = Field(3, ge=1, description="median blur window, mask pixels (odd)")
    closing_um: float = Field(16.0, ge=0, description="morphological closing radius, µm")
    max_hole_area_mm2: float = Field(0.01, ge=0, description="holes up to this area are filled")
    min_area_mm2: float = Field(0.005, ge=0, description="smaller tissue pieces are dropped")
    include_annotations: Path | None = Field(
        None, description="GeoJSON: keep tissue only inside these polygons (level-0 px)")
    exclude_annotations: Path | None = Field(
        None, description="GeoJSON: remove tissue inside these polygons (level-0 px)")


@dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide and how it maps to level 0."""

    mask: np.ndarray
    level0_size: tuple[int, int]
    mask_mpp: float
    threshold: float
    thumbnail: np.ndarray = field(repr=False)
    pen: np.ndarray = field(repr=False)

    @property
    def downsample(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along x and y."""
        return (self.level0_size[0] / self.mask.shape[1], self.level0_size[1] / self.mask.shape[0])

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mask_mpp * 1e-3) ** 2

    @cached_property
    def polygons(self) -> list[Polygon]:
        """Tissue outlines (with holes) in level-0 pixel coordinates, largest first."""
        return mask_to_polygons(self.mask, self.downsample)

    def to_geojson(self) -> dict:
        """QuPath-compatible FeatureCollection of the tissue polygons (level-0 pixels)."""
        return polygons_to_feature_collection(
            self.polygons, "Tissue",
            properties=[{"area_mm2": p.area * (self.mask_mpp / self.downsample[0] * 1e-3) ** 2}
                        for p in self.polygons])


def hsv_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] as float32, without a full colour conversion."""
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return saturation, high / 255.0


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) as float32 (0 for grey pixels)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6.0,
                   np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(chroma > 0, hue * 60.0, 0.0).astype(np.float32)


def pen_mark_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels coloured like marker ink rather than H&E: green/cyan/blue ink (hue 70–230°,
    saturated) and black ink (very dark). Eosin is pink-red and haematoxylin purple (hue
    > 250°), so stained tissue is not flagged."""
    saturation, value = hsv_saturation_value(rgb)
    hue = hue_degrees(rgb)
    coloured = (hue >= 70) & (hue <= 230) & (saturation > 0.3) & (value > 0.15)
    black = value < 0.2
    return coloured | black


def _box_majority(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    counts = ndi.uniform_filter(mask.astype(np.float32), size=size, mode="constant")
    return counts > 0.5


def _fill_small_holes(mask: np.ndarray, max_hole_pixels: float) -> np.ndarray:
    if max_hole_pixels <= 0:
        return mask
    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, count = ndi.label(holes)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_hole_pixels
    small[0] = False
    return mask | small[labels]


def _drop_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _rasterise(polygons: list[Polygon], shape: tuple[int, int],
               downsample: tuple[float, float]) -> np.ndarray:
    raster = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        exterior = np.asarray(polygon.exterior.coords)
        rows, cols = draw.polygon(exterior[:, 1] / downsample[1], exterior[:, 0] / downsample[0],
                                  shape=shape)
        raster[rows, cols] = True
        for interior in polygon.interiors:
            ring = np.asarray(interior.coords)
            rows, cols = draw.polygon(ring[:, 1] / downsample[1], ring[:, 0] / downsample[0],
                                      shape=shape)
            raster[rows, cols] = False
    return raster


def segment_tissue(rgb: np.ndarray, mask_mpp: float, settings: TissueSettings
                   ) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail at ``mask_mpp`` µm/px; returns (mask, threshold)."""
    saturation, value = hsv_saturation_value(rgb)
    if settings.saturation_threshold is not None:
        threshold = settings.saturation_threshold
    else:
        histogram_source = np.round(saturation * 255).astype(np.uint8)
        otsu = filters.threshold_otsu(histogram_source) / 255.0 if np.ptp(
            histogram_source) > 0 else 1.0
        threshold = max(float(otsu), settings.min_saturation)
    mask = (saturation > threshold) & (value >= settings.min_value)
    mask = _box_majority(mask, settings.median_size)
    radius = round(settings.closing_um / mask_mpp)
    if radius > 0:
        footprint = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
        padded = np.pad(mask, radius)
        mask = ndi.binary_closing(padded, structure=footprint)[radius:-radius, radius:-radius]
    pixel_mm2 = (mask_mpp * 1e-3) ** 2
    mask = _fill_small_holes(mask, settings.max_hole_area_mm2 / pixel_mm2)
    mask = _drop_small_objects(mask, settings.min_area_mm2 / pixel_mm2)
    return mask, threshold


def detect_tissue(slide: Slide, settings: TissueSettings | None = None) -> TissueMask:
    """Find tissue on ``slide`` at ``settings.mask_mpp`` and apply include/exclude annotations.

    An empty mask is a valid answer (blank glass); callers report it, never skip silently.
    """
    settings = settings or TissueSettings()
    mask_mpp = max(settings.mask_mpp, slide.level0_mpp)
    thumbnail = slide.thumbnail(target_mpp=mask_mpp)
    mask_mpp = slide.level0_mpp * slide.dimensions[0] / thumbnail.shape[1]
    mask, threshold = segment_tissue(thumbnail, mask_mpp, settings)
    downsample = (slide.dimensions[0] / mask.shape[1], slide.dimensions[1] / mask.shape[0])
    if settings.include_annotations is not None:
        mask &= _rasterise(read_polygons(settings.include_annotations), mask.shape, downsample)
    if settings.exclude_annotations is not None:
        mask &= ~_rasterise(read_polygons(settings.exclude_annotations), mask.shape, downsample)
    return TissueMask(mask=mask, level0_size=slide.dimensions, mask_mpp=mask_mpp,
                      threshold=threshold, thumbnail=thumbnail, pen=pen_mark_mask(thumbnail))


def mask_to_polygons(mask: np.ndarray, downsample: tuple[float, float]) -> list[Polygon]:
    """Vectorise a boolean mask into polygons with holes, scaled to level-0 pixels."""
    labels, _count = ndi.label(mask)
    polygons: list[Polygon] = []
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        component = np.pad(labels[box] == index, 1)
        rings = [c for c in measure.find_contours(component.astype(np.float32), 0.5)
                 if len(c) >= 4]
        if not rings:
            continue
        offset = np.array([box[0].start - 1, box[1].start - 1], dtype=np.float64)

        def to_level0(ring: np.ndarray, offset: np.ndarray = offset) -> np.ndarray:
            rc = ring + offset + 0.5
            return np.column_stack([rc[:, 1] * downsample[0], rc[:, 0] * downsample[1]])

        shells = [Polygon(to_level0(r)) for r in rings]
        outer = max(range(len(shells)), key=lambda i: shells[i].area)
        holes = [to_level0(rings[i]) for i in range(len(rings))
                 if i != outer and shells[outer].contains(shells[i].representative_point())]
        polygon = shapely.make_valid(Polygon(to_level0(rings[outer]), holes))
        parts = polygon.geoms if hasattr(polygon, "geoms") else [polygon]
        polygons.extend(p for p in parts if isinstance(p, Polygon) and p.area > 0)
    polygons.sort(key=lambda p: -p.area)
    return polygons
