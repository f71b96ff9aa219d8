"""``write_html_export``: a static, offline HTML export of graded slides with their heatmaps.

Layout of the export folder (opened from the file system, no server)::

    index.html                      worklist, highest predicted risk first
    worklist.csv                    the same table for spreadsheets (no paths)
    assets/                         stylesheet, page scripts, vendored OpenSeadragon
    slides/<rank>-<name>/index.html viewer page: slide + heatmap layer + top patches
    slides/<rank>-<name>/slide.dzi, slide_files/   Deep Zoom pyramid (JPEG tiles)
    slides/<rank>-<name>/heatmap.png               scores as 8-bit grey, alpha 0 = no data
    slides/<rank>-<name>/thumbnail.jpg

The folder is written beside its destination and renamed into place when complete. Only
pyramid pixels of each slide are read: no label or macro image, no slide properties, and the
slide's path and file name appear nowhere (error messages are stripped of them too).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from wsi import SlideError, open_slide
from wsi.atomic import atomic_directory

from .. import __version__
from .dzi import DEFAULT_VIEWER_MPP, JPEG_QUALITY, plan_dzi, write_dzi
from .heatmap_layer import HeatmapExtentError, check_extent, colormap_table, png_data_url, score_png
from .model import SlideView
from .pages import WorklistEntry, render_index, render_slide_page

log = logging.getLogger(__name__)

#: File that marks a folder as an HTML export, so that exporting again may replace it.
EXPORT_MARKER: Final = ".slidepipe-html-export"
DEFAULT_THRESHOLD: Final = 0.65
DEFAULT_OPACITY: Final = 0.5
THUMBNAIL_SIDE: Final = 256
_PACKAGE = resources.files(__package__)
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def write_html_export(out_dir: str | Path, views: Sequence[SlideView], *,
                      threshold: float = DEFAULT_THRESHOLD,
                      viewer_mpp: float = DEFAULT_VIEWER_MPP, colormap: str = "viridis",
                      title: str = "slidepipe worklist", opacity: float = DEFAULT_OPACITY,
                      jpeg_quality: int = JPEG_QUALITY, workers: int | None = None) -> Path:
    """Write the worklist and one viewer page per slide into ``out_dir``; returns the path of
    ``index.html``.

    Args:
        out_dir: The export folder. It is replaced as a whole when it holds an earlier export;
            any other non-empty folder is refused.
        views: The slides to show; the worklist lists them by ``risk``, highest first.
        threshold: The heatmap threshold the viewer starts with (scores below are hidden).
        viewer_mpp: µm/px of the viewer's finest level (never finer than the slide's level 0).
        colormap: A matplotlib colormap name for the heatmap.
        title: Title of the worklist page.
        opacity: The heatmap opacity the viewer starts with.
        jpeg_quality: JPEG quality of the slide tiles.
        workers: Threads reading and encoding tiles (default: up to 4, one per core).

    A slide that cannot be read is listed with its error and gets no viewer page; the others
    are exported. Raises ``ValueError`` for invalid arguments and ``FileExistsError`` when
    ``out_dir`` is a non-empty folder that is not an export.
    """
    for name, value in (("threshold", threshold), ("opacity", opacity)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be within [1, 100], got {jpeg_quality}")
    names = [view.slide_id for view in views]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"slide names must be unique in an export; repeated: "
                         f"{', '.join(duplicates)}")
    lut = colormap_table(colormap)
    out = Path(out_dir)
    _check_replaceable(out)
    workers = workers or min(4, os.cpu_count() or 1)
    ordered = sorted(views, key=lambda view: -view.risk)
    settings = (f"Heatmap threshold {threshold:.2f}, colormap {colormap}; slides shown at up to "
                f"{viewer_mpp:g} µm/px.")
    with atomic_directory(out) as folder:
        (folder / EXPORT_MARKER).write_text(
            json.dumps({"slidepipe_version": __version__, "slides": len(ordered)}) + "\n")
        _copy_tree(_PACKAGE.joinpath("static"), folder / "assets")
        _copy_tree(_PACKAGE.joinpath("vendor", "openseadragon"),
                   folder / "assets" / "openseadragon")
        entries = []
        for rank, view in enumerate(ordered, start=1):
            key = f"{rank:03d}-{_slug(view.slide_id)}"
            entries.append(_export_slide(
                folder, key, rank, view, lut=lut, threshold=threshold, opacity=opacity,
                viewer_mpp=viewer_mpp, title=title, quality=jpeg_quality, workers=workers))
        generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        (folder / "index.html").write_text(
            render_index(entries, title=title, settings=settings, generated=generated,
                         version=__version__), encoding="utf-8")
        (folder / "worklist.csv").write_text(_worklist_csv(entries), encoding="utf-8")
    failed = [entry for entry in entries if entry.error]
    log.info("HTML export %s: %d slides, %d without viewer", out, len(entries), len(failed))
    return out / "index.html"


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose a folder for the "
                              "HTML export")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise FileExistsError(f"{out}: the folder is not empty and holds no earlier HTML "
                              "export; choose a new or empty folder (it is replaced as a whole)")


def _copy_tree(source: Traversable, target: Path) -> None:
    """Copy package data (templates, scripts, vendored files) into the export."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        elif not entry.name.startswith("."):
            (target / entry.name).write_bytes(entry.read_bytes())


def _slug(name: str) -> str:
    """A file-system-safe folder name derived from the display name."""
    return _SLUG_UNSAFE.sub("-", name).strip("-.")[:48] or "slide"


def _export_slide(folder: Path, key: str, rank: int, view: SlideView, *, lut: list[list[int]],
                  threshold: float, opacity: float, viewer_mpp: float, title: str, quality: int,
                  workers: int) -> WorklistEntry:
    """Write one slide's pyramid, heatmap, thumbnail and page; a slide that cannot be read
    yields an entry with its error instead."""
    slide_dir = folder / "slides" / key
    slide_dir.mkdir(parents=True)
    try:
        with open_slide(view.slide_path, mpp=view.mpp) as slide:
            check_extent(view.heatmap.shape, view.heatmap_downsample, slide.dimensions)
            geometry = plan_dzi(slide, viewer_mpp)
            thumbnail = write_dzi(slide, slide_dir, geometry, quality=quality, workers=workers,
                                  thumbnail_side=THUMBNAIL_SIDE)
            shown_mpp = slide.level0_mpp * geometry.level0_per_pixel
    except (SlideError, HeatmapExtentError) as error:
        log.warning("HTML export: %s (%s) has no viewer page: %s", view.slide_id,
                    view.slide_path, error)
        shutil.rmtree(slide_dir)
        reason = error.message if isinstance(error, SlideError) else str(error)
        return WorklistEntry(view, rank, None, None, _redact(reason, view))
    png = score_png(view.heatmap)
    (slide_dir / "heatmap.png").write_bytes(png)
    Image.fromarray(np.ascontiguousarray(thumbnail)).save(slide_dir / "thumbnail.jpg",
                                                          quality=85)
    height, width = view.heatmap.shape
    data = {
        "name": view.slide_id,
        "slide": {"dzi": geometry.descriptor("slide_files/"), "width": geometry.level0_extent[0],
                  "mpp": shown_mpp},
        "heatmap": {"png": png_data_url(png), "width": width, "height": height,
                    "downsample": view.heatmap_downsample, "lut": lut,
                    "threshold": threshold, "opacity": opacity},
        "topPatches": [{"rank": p.rank, "x": p.x, "y": p.y, "size": p.size, "score": p.score}
                       for p in view.ranked_patches()],
    }
    page = render_slide_page(view, data, title=title, viewer_mpp=shown_mpp)
    (slide_dir / "index.html").write_text(page, encoding="utf-8")
    return WorklistEntry(view, rank, f"slides/{key}/index.html", f"slides/{key}/thumbnail.jpg")


def _redact(message: str, view: SlideView) -> str:
    """``message`` with the slide's path, file name and stem replaced by its display name."""
    path = Path(view.slide_path)
    secrets = {str(view.slide_path), str(path), str(path.resolve()), path.name}
    if len(path.stem) >= 3:
        secrets.add(path.stem)
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, view.slide_id)
    return message


def _worklist_csv(entries: Sequence[WorklistEntry]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "slide", "grade", "probability", "risk", "qc_status", "viewer",
                     "error"])
    for entry in entries:
        view = entry.view
        writer.writerow([entry.rank, view.slide_id, view.grade, view.grade_probability,
                         view.risk, view.qc_status, entry.page_url or "", entry.error or ""])
    return buffer.getvalue()
