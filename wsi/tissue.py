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
    closing_um: float = Field(
        16.0, ge=0, description="morphological closing, half the side of the square, µm")
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
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue)
    chroma = (high - np.minimum(np.minimum(red, green), blue)).astype(np.float32)
    value = high.astype(np.float32)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=high > 0)
    value *= 1.0 / 255.0
    return saturation, value


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) as float32 (0 for grey pixels)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6.0,
                   np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(chroma > 0, hue * 60.0, 0.0).astype(np.float32)


def pen_mark_mask(rgb: np.ndarray, saturation: np.ndarray | None = None,
                  value: np.ndarray | None = None) -> np.ndarray:
    """Pixels coloured like marker ink rather than H&E: green/cyan/blue ink (hue 70–230°,
    saturated) and black ink (very dark). Eosin is pink-red and haematoxylin purple (hue
    > 250°), so stained tissue is not flagged. Pass ``saturation``/``value`` when already
    computed; the hue is computed only for saturated pixels."""
    if saturation is None or value is None:
        saturation, value = hsv_saturation_value(rgb)
    pen = value < 0.2
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # hue 70–230° needs green or blue above red, which H&E pixels rarely have: test only those
    not_red = (green > red) | (blue > red)
    candidates = np.flatnonzero(not_red & (saturation > 0.3) & (value > 0.15))
    if candidates.size:
        hue = hue_degrees(rgb.reshape(-1, 3)[candidates])
        pen.reshape(-1)[candidates[(hue >= 70) & (hue <= 230)]] = True
    return pen


def _window_reduce(image: np.ndarray, size: int, ufunc: np.ufunc) -> np.ndarray:
    """Reduce every ``size`` x ``size`` window (centred, zero padding) with ``ufunc``, as two
    separable passes of shifted whole-array operations."""
    radius = size // 2
    for axis in (0, 1):
        length = image.shape[axis]
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])

        def shifted(offset: int, padded: np.ndarray = padded, axis: int = axis,
                    length: int = length) -> np.ndarray:
            return padded[offset:offset + length] if axis == 0 else \
                padded[:, offset:offset + length]

        out = shifted(0).copy()
        for offset in range(1, size):
            ufunc(out, shifted(offset), out=out)
        image = out
    return image


def _box_majority(mask: np.ndarray, size: int) -> np.ndarray:
    """True where most of the ``size`` x ``size`` window is true (a binary median filter)."""
    if size <= 1:
        return mask
    counts = _window_reduce(mask.astype(np.uint8 if size * size < 256 else np.uint16), size,
                            np.add)
    return counts > (size * size) // 2


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing with a (2r+1)-square; the border is padded so tissue at the
    slide's edge is not eroded."""
    side = 2 * radius + 1
    padded = np.pad(mask, radius)
    closed = _window_reduce(_window_reduce(padded, side, np.logical_or), side, np.logical_and)
    return closed[radius:-radius, radius:-radius]


def _small_components(region: np.ndarray, max_pixels: float, skip_border: bool
                      ) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    """The connected components of ``region`` with at most ``max_pixels`` pixels, each as
    (bounding box, its pixels inside the box). A component whose box is small is small; only
    the others are counted, so the cost follows the components, not the image."""
    labels, _ = ndi.label(region)
    height, width = region.shape
    found = []
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        rows, cols = box
        if skip_border and (rows.start == 0 or cols.start == 0 or rows.stop == height
                            or cols.stop == width):
            continue
        if (rows.stop - rows.start) * (cols.stop - cols.start) > max_pixels:
            pixels = labels[box] == index
            if np.count_nonzero(pixels) > max_pixels:
                continue
        else:
            pixels = labels[box] == index
        found.append((box, pixels))
    return found


def _fill_small_holes(mask: np.ndarray, max_hole_pixels: float) -> np.ndarray:
    """Fill background regions enclosed by tissue (not touching the border) up to a size."""
    if max_hole_pixels <= 0:
        return mask
    filled = mask.copy()
    for box, pixels in _small_components(~mask, max_hole_pixels, skip_border=True):
        filled[box] |= pixels
    return filled


def _drop_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Remove tissue pieces smaller than ``min_pixels``."""
    kept = mask.copy()
    for box, pixels in _small_components(mask, np.ceil(min_pixels) - 1, skip_border=False):
        kept[box] &= ~pixels
    return kept


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
    return _segment(*hsv_saturation_value(rgb), mask_mpp, settings)


def _otsu_threshold(saturation: np.ndarray) -> float:
    """Otsu's threshold (0-1) from the 256-bin saturation histogram of every second pixel in
    each direction (a quarter of the pixels; the histogram's shape is unchanged); 1.0 when the
    histogram is flat."""
    levels = (saturation[::2, ::2] * 255.0 + 0.5).astype(np.uint8)
    counts = np.bincount(levels.ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:
        return 1.0
    return float(filters.threshold_otsu(hist=(counts, np.arange(256)))) / 255.0


def _segment(saturation: np.ndarray, value: np.ndarray, mask_mpp: float,
             settings: TissueSettings) -> tuple[np.ndarray, float]:
    if settings.saturation_threshold is not None:
        threshold = settings.saturation_threshold
    else:
        threshold = max(_otsu_threshold(saturation), settings.min_saturation)
    mask = (saturation > threshold) & (value >= settings.min_value)
    mask = _box_majority(mask, settings.median_size)
    radius = round(settings.closing_um / mask_mpp)
    if radius > 0:
        mask = _close(mask, radius)
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
    saturation, value = hsv_saturation_value(thumbnail)
    mask, threshold = _segment(saturation, value, mask_mpp, settings)
    downsample = (slide.dimensions[0] / mask.shape[1], slide.dimensions[1] / mask.shape[0])
    if settings.include_annotations is not None:
        mask &= _rasterise(read_polygons(settings.include_annotations), mask.shape, downsample)
    if settings.exclude_annotations is not None:
        mask &= ~_rasterise(read_polygons(settings.exclude_annotations), mask.shape, downsample)
    return TissueMask(mask=mask, level0_size=slide.dimensions, mask_mpp=mask_mpp,
                      threshold=threshold, thumbnail=thumbnail,
                      pen=pen_mark_mask(thumbnail, saturation, value))


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
