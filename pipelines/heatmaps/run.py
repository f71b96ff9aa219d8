"""Per-slide heatmap exports and the loop over an archive.

Layout of an export folder ``OUT``::

    OUT/<slide>/overlay.png        thumbnail + heatmap over tissue + threshold outlines + legend
    OUT/<slide>/heatmap.tiff       scores as a pyramidal TIFF, the slide's level-0 size and mpp
    OUT/<slide>/heatmap.geojson    QuPath: a tile per patch with measurements, threshold regions
    OUT/<slide>/top_patches/       the top-k crops and index.csv
    OUT/<slide>/summary.json       grade, probabilities, provenance, settings, file names
    OUT/heatmap_summary.csv        one row per slide: status, counts, seconds, error

``<slide>`` is the slide id, or its pseudonym with ``pseudonymise`` (the mapping CSV and the key
are then written outside ``OUT``). A slide's folder is written under a temporary name and
renamed into place, so it is complete or absent. Only pyramid pixels are read from slides.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import wsi
from mil.heatmap import PatchSet, render_slide, threshold_regions
from wsi.atomic import (
    atomic_directory,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

from .. import __version__
from ..discovery import SlideEntry
from .exports import (
    OutlinedRegion,
    blend_over_tissue,
    outline_regions,
    overlay_png,
    region_class,
    write_gallery,
    write_geojson,
    write_score_tiff,
)
from .pseudonyms import Pseudonymiser, check_outside, default_mapping_path, load_or_create_key
from .scores import (
    HeatmapInputError,
    Prediction,
    SlideScores,
    TopPatch,
    find_store,
    grid_spec,
    load_scores,
    read_predictions,
)
from .settings import HeatmapSettings

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = "slidepipe.heatmap/1"
SUMMARY_CSV = "heatmap_summary.csv"

ExtraPatches = Sequence[tuple[np.ndarray, np.ndarray, int]]
"""Further patches of a slide as (coords (M, 2) level-0, raw scores (M,), footprint level-0 px),
e.g. finer patches re-extracted at overlap inside the top regions; they are normalised on the
slide's scale and averaged into the same map where they overlap."""


@dataclass(frozen=True)
class SlideHeatmap:
    """One slide's rendered heatmap: what the exports (and the HTML viewer) show.

    ``raster`` is float32 normalised scores in [0, 1], NaN where no patch lies, covering the
    slide from level-0 (0, 0) at ``downsample`` level-0 px per pixel, the same grid as
    ``thumbnail``; ``regions`` are the threshold regions in level-0 px.
    """

    raster: np.ndarray
    downsample: float
    thumbnail: np.ndarray
    legend: str
    regions: list[OutlinedRegion]
    top_patches: list[TopPatch]
    slide_mpp: float


@dataclass
class HeatmapResult:
    """One row of ``heatmap_summary.csv``."""

    slide: str
    status: str  # ok, failed
    patches: int = 0
    regions: int = 0
    region_area_mm2: float = 0.0
    seconds: float = 0.0
    folder: str = ""
    error: str = ""


def overlay_mpp(slide_size: tuple[int, int], slide_mpp: float,
                settings: HeatmapSettings) -> float:
    """µm/px of the overlay raster: ``output_mpp`` or the slide fitted into
    ``overlay_max_side``, never finer than level 0."""
    fitted = slide_mpp * max(slide_size) / settings.overlay_max_side
    return max(settings.output_mpp or fitted, slide_mpp)


def build_heatmap(slide: wsi.Slide, scores: SlideScores, settings: HeatmapSettings,
                  extra: Sequence[PatchSet] = ()) -> SlideHeatmap:
    """Render one slide's overlay raster (tile by tile) beside its thumbnail, with the
    threshold regions and the top patches."""
    mpp = slide.level0_mpp
    thumbnail = slide.thumbnail(target_mpp=overlay_mpp(slide.dimensions, mpp, settings))
    height, width = thumbnail.shape[:2]
    downsample = slide.dimensions[0] / width
    sigma_px = settings.smooth_um / (mpp * downsample)
    raster = render_slide([scores.patch_set(), *extra], width, height, downsample,
                          sigma_px=sigma_px)
    legend = scores.normaliser.legend
    if settings.smooth_um:
        legend += f"; Gaussian smoothing, sigma {settings.smooth_um:g} µm"
    regions = outline_regions(threshold_regions(raster, settings.threshold, downsample),
                              slide.dimensions)
    return SlideHeatmap(raster=raster, downsample=downsample, thumbnail=thumbnail,
                        legend=legend, regions=regions, top_patches=scores.top(settings.top_k),
                        slide_mpp=mpp)


def _open_slide(path: Path, backend: str, mpp: float | None, grid: dict[str, Any]
                ) -> wsi.Slide:
    """The slide, with the µm/px the features were made with when the file records none."""
    slide = wsi.open_slide(path, backend, mpp=mpp)
    if mpp is None and slide.metadata_mpp is None and grid.get("level0_mpp"):
        slide.close()
        slide = wsi.open_slide(path, backend, mpp=float(grid["level0_mpp"]))
    return slide


def _check_match(slide: wsi.Slide, scores: SlideScores, store: Path) -> None:
    if scores.slide_hash and scores.slide_hash != slide.content_hash:
        raise HeatmapInputError(f"{store} was made from another slide (content hash differs); "
                                "run slidepipe extract and predict on this slide")
    width, height = slide.dimensions
    if len(scores.coords) and (scores.coords.min() < 0 or scores.coords[:, 0].max() >= width
                               or scores.coords[:, 1].max() >= height):
        raise HeatmapInputError(f"{store}: patch coordinates fall outside the slide "
                                f"({width} x {height}); the features belong to another slide")


def export_slide(slide_path: Path, store_path: Path, prediction: Prediction, folder: Path,
                 settings: HeatmapSettings, *, name: str, mpp: float | None = None,
                 backend: str = "auto", extra: ExtraPatches = ()) -> dict[str, Any]:
    """Write every export of one slide into ``folder`` (atomically); returns its summary.

    ``name`` is what the slide is called in the files (its id or pseudonym); the slide's path
    and file name are written nowhere.
    """
    scores = load_scores(store_path, prediction, settings)
    with _open_slide(slide_path, backend, mpp, scores.grid) as slide:
        _check_match(slide, scores, store_path)
        extra_sets = [scores.extra_set(c, s, f) for c, s, f in extra]
        heatmap = build_heatmap(slide, scores, settings, extra_sets)
        size, slide_mpp = slide.dimensions, heatmap.slide_mpp
        area_mm2 = sum(r.polygon.area for r in heatmap.regions) * (slide_mpp * 1e-3) ** 2
        backbone = scores.provenance.get("backbone")
        title = f"{name}: predicted {prediction.predicted}"
        if prediction.probability is not None:
            title += f" (p = {prediction.probability:.3f})"
        legend = [heatmap.legend,
                  f"colormap {settings.colormap}; outlined: score >= {settings.threshold:g} "
                  f"({len(heatmap.regions)} regions, {area_mm2:.3f} mm²); model "
                  f"{prediction.model_hash}; {backbone} features"]
        exports: dict[str, str] = {"overlay": "overlay.png", "summary": "summary.json"}
        with atomic_directory(folder) as tmp:
            image = blend_over_tissue(heatmap.thumbnail, heatmap.raster, settings.colormap,
                                      settings.opacity)
            write_bytes_atomic(tmp / "overlay.png", overlay_png(
                image, heatmap.downsample, heatmap.regions, title=title, legend=legend,
                colormap=settings.colormap, threshold=settings.threshold))
            if settings.tiff:
                write_score_tiff(tmp / "heatmap.tiff", [scores.patch_set(), *extra_sets], size,
                                 slide_mpp)
                exports["tiff"] = "heatmap.tiff"
            if settings.geojson:
                write_geojson(tmp / "heatmap.geojson", scores, heatmap.regions, size,
                              slide_mpp, settings.threshold)
                exports["geojson"] = "heatmap.geojson"
            gallery: list[dict[str, object]] = []
            if heatmap.top_patches:
                gallery = write_gallery(tmp / "top_patches", slide, grid_spec(scores.grid),
                                        heatmap.top_patches, settings.gallery_format)
                exports["gallery"] = "top_patches/index.csv"
            summary = {
                "schema": SUMMARY_SCHEMA, "slide": name, "grade": prediction.predicted,
                "probability": prediction.probability,
                "probabilities": prediction.probabilities,
                "model_hash": prediction.model_hash, "attention_array": prediction.attention,
                "attention_class": scores.attention_class,
                "features": scores.provenance, "slide_width": size[0], "slide_height": size[1],
                "slide_mpp": slide_mpp, "patches": len(scores.coords),
                "extra_patches": sum(len(s) for s in extra_sets),
                "heatmap": {**settings.model_dump(mode="json", exclude={
                    "pseudonym_key", "pseudonym_map"}), "legend": heatmap.legend,
                    "overlay_downsample": heatmap.downsample,
                    "overlay_mpp": slide_mpp * heatmap.downsample,
                    "tiff_encoding": "uint8: 0 = no patch, code = 1 + round(254 x score)"},
                "threshold_regions": {"class": region_class(settings.threshold),
                                      "count": len(heatmap.regions),
                                      "area_mm2": round(area_mm2, 6)},
                "top_patches": gallery, "exports": exports,
                "slidepipe_version": __version__,
            }
            write_json_atomic(tmp / "summary.json", summary)
    return summary


def _pseudonymiser(out: Path, settings: HeatmapSettings) -> tuple[Pseudonymiser, Path]:
    mapping = settings.pseudonym_map or default_mapping_path(out)
    key = settings.pseudonym_key or mapping.with_suffix(".key")
    check_outside(mapping, out)
    check_outside(key, out)
    return Pseudonymiser(load_or_create_key(key)), mapping


def _scrub(message: str, entry: SlideEntry, name: str) -> str:
    """``message`` with the slide's path, file name and id replaced by ``name``."""
    for secret in (str(entry.path.absolute()), str(entry.path), entry.path.name,
                   entry.slide_id):
        message = message.replace(secret, name)
    return message


def write_summary_csv(path: Path, results: Sequence[HeatmapResult]) -> Path:
    """``heatmap_summary.csv``: one row per slide, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(HeatmapResult.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    write_text_atomic(path, buffer.getvalue())
    return path


def export_heatmaps(entries: Sequence[SlideEntry], predictions_csv: Path, features: Path,
                    out: Path, settings: HeatmapSettings, *, backend: str = "auto",
                    extra: Mapping[str, ExtraPatches] | None = None,
                    on_slide: Callable[[HeatmapResult], None] | None = None
                    ) -> list[HeatmapResult]:
    """Export every slide of ``entries`` into ``out``; a failing slide is recorded (status
    ``failed`` with its error in ``heatmap_summary.csv``) and the others go on.

    ``extra`` maps slide ids to further patches to merge into their maps (see
    :data:`ExtraPatches`). Raises :class:`HeatmapInputError` only for a predictions CSV that
    cannot be read, and :class:`~pipelines.heatmaps.pseudonyms.PseudonymError` for a key or
    mapping that cannot be used.
    """
    predictions = read_predictions(predictions_csv)
    out.mkdir(parents=True, exist_ok=True)
    pseudonymise, mapping = (_pseudonymiser(out, settings) if settings.pseudonymise
                             else (None, None))
    results: list[HeatmapResult] = []
    for entry in entries:
        name = pseudonymise(entry.slide_id) if pseudonymise else entry.slide_id
        result = HeatmapResult(slide=name, status="failed")
        start = time.perf_counter()
        try:
            prediction = predictions.get(entry.slide_id)
            if prediction is None:
                raise HeatmapInputError(f"{predictions_csv} has no prediction for slide "
                                        f"{entry.slide_id}; run slidepipe predict on it")
            store = find_store(features, entry.slide_id, prediction.attention)
            summary = export_slide(entry.path, store, prediction, out / name, settings,
                                   name=name, mpp=entry.mpp, backend=backend,
                                   extra=(extra or {}).get(entry.slide_id, ()))
            result.status, result.folder = "ok", name
            result.patches = summary["patches"]
            result.regions = summary["threshold_regions"]["count"]
            result.region_area_mm2 = summary["threshold_regions"]["area_mm2"]
        except Exception as error:  # one bad slide must not stop the archive
            log.exception("%s: heatmap export failed", entry.path)
            message = f"{type(error).__name__}: {error}"
            result.error = _scrub(message, entry, name) if pseudonymise else message
        result.seconds = round(time.perf_counter() - start, 3)
        results.append(result)
        if on_slide is not None:
            on_slide(result)
    write_summary_csv(out / SUMMARY_CSV, results)
    if pseudonymise and mapping is not None:
        pseudonymise.write_mapping(mapping)
    return results
