"""The export stage: each slide's heatmap exports, and the run's HTML worklist.

Per slide, on a worker, :func:`pipelines.heatmaps.export_slide` writes
``OUT/heatmaps/<slide>/`` (overlay PNG, pyramidal TIFF of the scores, QuPath GeoJSON, top-patch
gallery, ``summary.json``) as one atomic folder. At the end of a run, the slides exported by it
get an HTML worklist with deep-zoom viewers in ``OUT/worklists/run-<id>/``: tonight's cases,
highest risk first, made by :mod:`pipelines.heatmaps.worklist` as for ``slidepipe heatmap``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi.grid_store import PROVENANCE_NAME

from ..heatmaps import HeatmapSettings, Prediction, export_slide
from ..heatmaps.worklist import slide_view, write_views
from ..html_export import SlideView


@dataclass(frozen=True)
class ExportJob:
    """One slide to export."""

    slide_path: str
    store: str
    prediction: Prediction
    folder: str
    settings: HeatmapSettings
    name: str
    mpp: float | None
    backend: str


def export_slide_heatmaps(job: ExportJob) -> dict[str, Any]:
    """Write the slide's heatmap exports (runs on a worker); returns what the run records."""
    summary = export_slide(Path(job.slide_path), Path(job.store), job.prediction,
                           Path(job.folder), job.settings, name=job.name, mpp=job.mpp,
                           backend=job.backend)
    return {"folder": job.folder, "exports": summary["exports"], "patches": summary["patches"],
            "regions": summary["threshold_regions"]["count"],
            "region_area_mm2": summary["threshold_regions"]["area_mm2"]}


def prediction_of(slide_id: str, record: dict[str, Any]) -> Prediction:
    """The heatmap exporters' view of a prediction the run recorded."""
    return Prediction(slide_id=slide_id, predicted=record["predicted"],
                      probabilities=dict(record["probabilities"]),
                      model_hash=record["model_hash"], attention=record["attention"])


@dataclass(frozen=True)
class WorklistSlide:
    """A slide of the run's HTML worklist."""

    slide_id: str
    slide_path: str
    store: Path
    grid_folder: Path
    prediction: dict[str, Any]
    risk: float
    mpp: float | None
    qc_status: str


def worklist_view(slide: WorklistSlide, settings: HeatmapSettings) -> SlideView:
    """The worklist's view of one slide, its level-0 size read from its grid folder."""
    record = json.loads((slide.grid_folder / PROVENANCE_NAME).read_text())["provenance"]
    size = (record["slide"]["width"], record["slide"]["height"])
    return slide_view(slide.slide_id, slide.slide_path,
                      prediction_of(slide.slide_id, slide.prediction), slide.store, size,
                      settings, risk=slide.risk, qc_status=slide.qc_status, mpp=slide.mpp)


def write_worklist(folder: Path, slides: Sequence[WorklistSlide], settings: HeatmapSettings,
                   title: str) -> Path:
    """Write the HTML worklist of ``slides`` into ``folder``; returns its ``index.html``."""
    return write_views(folder, [worklist_view(slide, settings) for slide in slides], settings,
                       title)
