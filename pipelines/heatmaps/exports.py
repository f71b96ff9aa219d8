"""The files of a slide's heatmap export: overlay PNG, pyramidal TIFF, QuPath GeoJSON and the
top-k patch gallery. Each writer takes plain values and writes one thing; none reads a label or
macro image or any slide property."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke
from PIL import Image
from shapely.geometry import Polygon, box

import wsi
from mil.heatmap import CodeTiles, PatchSet, Region
from mil.heatmap_scale import colormap_lut
from wsi.geojson import polygons_to_feature_collection
from wsi.scalar_writer import write_scalar_pyramid
from wsi.tissue import hsv_saturation_value

from .scores import SlideScores, TopPatch

#: Overlay pixels count as tissue (and get the heatmap) above this HSV saturation and value;
#: blank glass is white or light grey with almost no saturation.
TISSUE_MIN_SATURATION = 0.05
TISSUE_MIN_VALUE = 0.08

#: QuPath class and colour of the threshold regions.
REGION_COLOUR = (255, 0, 0)

#: Margins of the overlay figure around the slide image, px: left, right (colour bar), top
#: (title), bottom (legend); images with a longer side under _MIN_IMAGE_SIDE are enlarged.
_MARGINS = (16, 120, 56, 76)
_MIN_IMAGE_SIDE = 512
_DPI = 100


def region_class(threshold: float) -> str:
    """The QuPath classification name of the threshold regions."""
    return f"heatmap >= {threshold:g}"


@dataclass(frozen=True)
class OutlinedRegion:
    """A threshold region as a valid polygon in level-0 px, clipped to the slide, with the
    mean and maximum score of the raster pixels it was traced from."""

    polygon: Polygon
    mean_score: float
    max_score: float


def outline_regions(regions: Sequence[Region], slide_size: tuple[int, int]
                    ) -> list[OutlinedRegion]:
    """Threshold regions as valid shapely polygons clipped to the slide, largest first."""
    frame = box(0, 0, *slide_size)
    outlined: list[OutlinedRegion] = []
    for region in regions:
        shape = shapely.make_valid(Polygon(region.exterior, list(region.holes)))
        shape = shape.intersection(frame)
        outlined.extend(OutlinedRegion(part, region.mean_score, region.max_score)
                        for part in getattr(shape, "geoms", [shape])
                        if isinstance(part, Polygon) and part.area > 0)
    outlined.sort(key=lambda r: -r.polygon.area)
    return outlined


def blend_over_tissue(thumbnail: np.ndarray, raster: np.ndarray, colormap: str,
                      opacity: float) -> np.ndarray:
    """The thumbnail with the heatmap blended in where there is tissue and a score."""
    saturation, value = hsv_saturation_value(thumbnail)
    finite = np.isfinite(raster)
    mask = (saturation > TISSUE_MIN_SATURATION) & (value >= TISSUE_MIN_VALUE) & finite
    weight = round(opacity * 256)
    colours = colormap_lut(colormap)[:, :3].astype(np.uint16) * weight + 128
    index = np.rint(np.clip(np.where(finite, raster, 0.0), 0.0, 1.0) * 255).astype(np.uint8)
    blended = ((thumbnail.astype(np.uint16) * (256 - weight) + colours[index]) >> 8
               ).astype(np.uint8)
    return np.where(mask[..., None], blended, thumbnail)


def overlay_png(image: np.ndarray, downsample: float, regions: Sequence[OutlinedRegion], *,
                title: str, legend: Sequence[str], colormap: str, threshold: float) -> bytes:
    """PNG bytes of the overlay figure: the blended slide image at its own pixel size (small
    images enlarged by a whole factor), threshold outlines, a colour bar with the threshold
    marked, the title and legend lines.

    matplotlib draws everything but the image on a transparent canvas, which is then laid
    over the image pasted in place: a large image is never resampled by matplotlib.
    """
    scale = max(1, -(-_MIN_IMAGE_SIDE // max(image.shape[:2])))
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    height, width = image.shape[:2]
    left, right, top, bottom = _MARGINS
    fig_w, fig_h = width + left + right, height + top + bottom
    figure = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="none")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    stroke = [withStroke(linewidth=2.8, foreground="white")]
    for region in regions:
        for ring in (region.polygon.exterior, *region.polygon.interiors):
            xy = np.asarray(ring.coords) * (scale / downsample)
            axes.plot(xy[:, 0], xy[:, 1], color="black", linewidth=1.2, path_effects=stroke)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    bar = figure.add_axes(((left + width + 24) / fig_w, bottom / fig_h, 18 / fig_w,
                           height / fig_h))
    figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormap), cax=bar,
                    label="normalised score")
    bar.axhline(threshold, color="black", linewidth=2, path_effects=stroke)
    figure.text(left / fig_w, 1 - 12 / fig_h, title, fontsize=13, fontweight="bold", va="top")
    for index, line in enumerate(legend):
        figure.text(left / fig_w, (bottom - 18 - 17 * index) / fig_h, line, fontsize=9,
                    va="top")
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())
    base = np.full((*drawn.shape[:2], 3), 255, dtype=np.uint8)
    base[top:top + height, left:left + width] = image
    alpha = drawn[..., 3:].astype(np.uint16)
    rgb = ((drawn[..., :3] * alpha + base * (255 - alpha) + 127) // 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_score_tiff(path: Path, patch_sets: Sequence[PatchSet], slide_size: tuple[int, int],
                     mpp: float) -> Path:
    """The unsmoothed normalised scores as a pyramidal generic TIFF with exactly the slide's
    level-0 size and µm/px: uint8, 0 = no patch, 1..255 = score 0..1 (code = 1 + 254 x score)."""
    return write_scalar_pyramid(path, CodeTiles(patch_sets, slide_size), slide_size, mpp=mpp)


def _tile_features(scores: SlideScores, slide_size: tuple[int, int]) -> Iterator[str]:
    """One QuPath ``tile`` feature per patch (its footprint clipped to the slide), with the
    measurements attention, score (normalised) and rank (1 = highest)."""
    width, height = slide_size
    size = scores.footprint
    x0 = np.clip(scores.coords[:, 0], 0, width)
    y0 = np.clip(scores.coords[:, 1], 0, height)
    x1 = np.clip(scores.coords[:, 0] + size, 0, width)
    y1 = np.clip(scores.coords[:, 1] + size, 0, height)
    rows = zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), scores.attention.tolist(),
               scores.values.tolist(), scores.ranks.tolist(), strict=True)
    for left, top, right, bottom, attention, score, rank in rows:
        if right <= left or bottom <= top:
            continue
        ring = (f"[[{left},{top}],[{right},{top}],[{right},{bottom}],[{left},{bottom}],"
                f"[{left},{top}]]")
        yield ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[' + ring +
               ']},"properties":{"objectType":"tile","measurements":{"attention":' +
               repr(float(attention)) + ',"score":' + f"{score:.6g}" + ',"rank":' + str(rank) +
               "}}}")


def write_geojson(path: Path, scores: SlideScores, regions: Sequence[OutlinedRegion],
                  slide_size: tuple[int, int], slide_mpp: float, threshold: float) -> Path:
    """QuPath GeoJSON (level-0 px): a ``tile`` per patch with its measurements, then the
    threshold regions as classified annotations with their area and scores; written feature
    by feature."""
    measurements = [{"area_mm2": round(r.polygon.area * (slide_mpp * 1e-3) ** 2, 6),
                     "mean_score": round(r.mean_score, 6), "max_score": round(r.max_score, 6)}
                    for r in regions]
    annotations = polygons_to_feature_collection(
        [r.polygon for r in regions], region_class(threshold), REGION_COLOUR,
        measurements)["features"]
    features = itertools.chain(_tile_features(scores, slide_size),
                               (json.dumps(f) for f in annotations))
    with open(path, "w") as handle:
        handle.write('{"type":"FeatureCollection","features":[')
        for index, feature in enumerate(features):
            handle.write(("\n" if index == 0 else ",\n") + feature)
        handle.write("\n]}\n")
    return path


def write_gallery(folder: Path, slide: wsi.Slide, spec: wsi.GridSpec, top: Sequence[TopPatch],
                  image_format: str) -> list[dict[str, object]]:
    """Crops of the top patches read at the grid's resolution, named by rank, level-0
    coordinates and score, with ``index.csv``; returns the index rows."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "jpg" if image_format == "jpeg" else "png"
    rows: list[dict[str, object]] = []
    with wsi.PatchReader(slide, spec) as reader:
        for patch in top:
            name = f"rank{patch.rank:03d}_x{patch.x}_y{patch.y}_score{patch.score:.3f}.{suffix}"
            image = Image.fromarray(reader.read_patch(patch.x, patch.y))
            options = {"quality": 92} if suffix == "jpg" else {"compress_level": 3}
            image.save(folder / name, format=image_format.upper(), **options)
            rows.append({"rank": patch.rank, "score": round(patch.score, 6),
                         "attention": patch.attention, "x": patch.x, "y": patch.y,
                         "size_level0": patch.size, "file": name})
    with open(folder / "index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["rank", "score", "attention", "x", "y",
                                                    "size_level0", "file"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
