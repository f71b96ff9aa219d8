"""The tiling stage for one slide: open → tissue → grid → (pixel QC) → outputs on disk.

Outputs of a slide appear all at once (an atomic folder rename) under ``OUT/<slide_id>/``:
``grid.zarr``, ``coords.h5``, ``provenance.json``, ``tissue.png``, ``tissue.geojson`` and
``overview.png`` (the slide with the grid drawn). A slide without tissue still gets its outputs,
with an empty grid and the status ``no_tissue``; a slide that fails gets none, and its error.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import wsi
from wsi.atomic import atomic_directory, write_text_atomic
from wsi.fingerprint import content_hash
from wsi.grid_store import PROVENANCE_NAME
from wsi.tiling import TileGrid
from wsi.tissue import TissueMask

from . import __version__
from .config import SlidepipeConfig
from .discovery import SlideEntry

log = logging.getLogger(__name__)

OVERVIEW_MAX_PX = 1600
QC_BATCH = 64
#: Config sections that change a grid; a grid made with the same values can be reused.
GRID_SECTIONS = ("slides", "tissue", "tiling", "qc")


@dataclass
class TileResult:
    """One row of the tiling summary."""

    slide_id: str
    path: str
    status: str  # "ok", "no_tissue" or "failed"
    backend: str = ""
    mpp: float | None = None
    patches: int = 0
    tissue_area_mm2: float = 0.0
    seconds: float = 0.0
    error: str = ""


def _overview(slide: wsi.Slide, grid: TileGrid) -> Image.Image:
    image = Image.fromarray(slide.thumbnail(size=(OVERVIEW_MAX_PX, OVERVIEW_MAX_PX)))
    scale_x = image.width / slide.dimensions[0]
    scale_y = image.height / slide.dimensions[1]
    draw = ImageDraw.Draw(image)
    size = grid.spec.patch_size_level0
    for x, y in grid.coords:
        draw.rectangle([x * scale_x, y * scale_y, (x + size) * scale_x - 1,
                        (y + size) * scale_y - 1], outline=(0, 170, 0))
    return image


def _pixel_qc(slide: wsi.Slide, grid: TileGrid, config: SlidepipeConfig) -> TileGrid:
    with wsi.PatchReader(slide, grid.spec) as reader:
        parts = [wsi.measure_patches(batch) for batch in reader.iter_batches(grid.coords,
                                                                             QC_BATCH)]
    if not parts:
        return grid
    measured = grid.with_measurements(
        {name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
    return measured.select(wsi.qc_keep(measured.measurements, config.qc))


def _write_outputs(folder: Path, slide: wsi.Slide, entry: SlideEntry, tissue: TissueMask,
                   grid: TileGrid, config: SlidepipeConfig) -> None:
    provenance = {
        "slide_path": str(entry.path), "slide_id": entry.slide_id,
        "slide_hash": slide.content_hash, "slide": slide.summary(),
        "tissue_threshold": tissue.threshold, "tissue_mask_mpp": tissue.mask_mpp,
        "slidepipe_version": __version__, "created": datetime.now(UTC).isoformat(),
        "config": config.resolved(),
    }
    wsi.save_grid(grid, folder, slide_name=entry.slide_id,
                  level_dimensions=[list(d) for d in slide.level_dimensions],
                  provenance=provenance)
    Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(folder / "tissue.png")
    (folder / "tissue.geojson").write_text(json.dumps(tissue.to_geojson()))
    _overview(slide, grid).save(folder / "overview.png")


def describe_error(error: BaseException) -> str:
    """The one-line message a failed slide is reported with: the error itself for the expected
    kinds (unreadable slide, I/O, bad value), prefixed with its type for anything else."""
    if isinstance(error, wsi.SlideError | OSError | ValueError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error}"


def given_mpp(entry: SlideEntry, config: SlidepipeConfig,
              mpp_overrides: dict[str, float] | None = None) -> float | None:
    """The µm/px the user gave for this slide (manifest, overrides table, config), if any;
    ``None`` means the slide's own metadata is used."""
    per_slide = wsi.lookup_mpp_override(mpp_overrides, entry.path) if mpp_overrides else None
    return entry.mpp or per_slide or config.slides.mpp


def make_grid(entry: SlideEntry, config: SlidepipeConfig, out_dir: Path,
              mpp_overrides: dict[str, float] | None = None) -> TileResult:
    """Tile one slide into ``out_dir/<slide_id>``; status ``ok`` or ``no_tissue``.

    Raises for a slide that cannot be tiled (see :func:`tile_slide` for the variant that
    records the failure instead); nothing is written then.
    """
    start = time.perf_counter()
    result = TileResult(slide_id=entry.slide_id, path=str(entry.path), status="ok")
    mpp = given_mpp(entry, config, mpp_overrides)
    with wsi.open_slide(entry.path, config.slides.backend, mpp=mpp) as slide:
        result.backend = slide.backend_name
        result.mpp = round(slide.level0_mpp, 5)
        tissue = wsi.detect_tissue(slide, config.tissue)
        spec = wsi.plan_grid(slide, config.tiling)
        grid = wsi.build_grid(tissue, spec, config.tiling)
        if config.qc.enabled and len(grid):
            grid = _pixel_qc(slide, grid, config)
        with atomic_directory(out_dir / entry.slide_id) as folder:
            _write_outputs(folder, slide, entry, tissue, grid, config)
    result.patches = len(grid)
    result.tissue_area_mm2 = round(tissue.area_mm2, 4)
    if tissue.is_empty or len(grid) == 0:
        result.status = "no_tissue"
        result.error = ("no tissue found" if tissue.is_empty else
                        "tissue found but no patch reaches the minimum tissue fraction")
        log.warning("%s: %s", entry.path, result.error)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def tile_slide(entry: SlideEntry, config: SlidepipeConfig, out_dir: Path,
               mpp_overrides: dict[str, float] | None = None) -> TileResult:
    """Tile one slide into ``out_dir/<slide_id>``; never raises for a bad slide (its result
    has status ``failed`` and the error; the traceback goes to the log)."""
    start = time.perf_counter()
    try:
        return make_grid(entry, config, out_dir, mpp_overrides)
    except Exception as error:  # a broken slide must never stop the archive
        log.error("%s: %s", entry.path, error, exc_info=True)
        return TileResult(slide_id=entry.slide_id, path=str(entry.path), status="failed",
                          error=describe_error(error),
                          seconds=round(time.perf_counter() - start, 3))


def grid_folder_is_current(folder: Path, entry: SlideEntry, config: SlidepipeConfig,
                           mpp_overrides: dict[str, float] | None = None) -> bool:
    """True when ``folder`` holds a grid of this very slide (same content hash) made with the
    same grid settings and the same user-given µm/px, so it can be reused instead of tiling
    again."""
    try:
        record = json.loads((folder / PROVENANCE_NAME).read_text())["provenance"]
    except (OSError, KeyError, ValueError):
        return False
    made_with, wanted = record.get("config", {}), config.resolved()
    if any(made_with.get(section) != wanted[section] for section in GRID_SECTIONS):
        return False
    slide = record.get("slide", {})
    override = slide.get("mpp_x") if slide.get("mpp_source") == "override" else None
    if override != given_mpp(entry, config, mpp_overrides):
        return False
    try:
        return record.get("slide_hash") == content_hash(entry.path)
    except OSError:
        return False


def write_csv_atomic(path: Path, rows: list[dict[str, object]]) -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV, atomically; returns the path."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return path


def write_summary(results: list[TileResult], out_dir: Path) -> Path:
    """Write ``out_dir/summary.csv`` (one row per slide) atomically; returns its path."""
    return write_csv_atomic(out_dir / "summary.csv", [asdict(r) for r in results])
