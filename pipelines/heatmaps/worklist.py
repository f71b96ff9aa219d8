"""The static HTML worklist of heatmap exports: highest risk first, one deep-zoom viewer per
slide with its heatmap as a layer (:func:`pipelines.html_export.write_html_export`).

Shared by ``slidepipe heatmap`` (:func:`write_heatmap_worklist`, into ``OUT/worklist/``) and
``slidepipe run`` (:mod:`pipelines.run.export`, into ``OUT/worklists/run-<id>/``). The heatmap
layers are rendered at patch resolution (one raster pixel per patch step), so a view costs
little memory however large the slide. Not imported by :mod:`pipelines.heatmaps` itself: the
triage risk comes from :mod:`pipelines.run.predict`, which loads torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from mil.heatmap import render_slide

from ..discovery import SlideEntry
from ..html_export import SlideView, TopPatch, write_html_export
from ..run.predict import risk_score
from .run import HeatmapResult
from .scores import Prediction, find_store, load_scores, read_predictions
from .settings import HeatmapSettings

#: The HTML worklist's folder inside a ``slidepipe heatmap`` export folder.
WORKLIST_DIR = "worklist"

#: QC status of a listed slide. As in ``slidepipe run``: a slide that was tiled, predicted and
#: exported is shown as ``ok`` (pixel QC, when enabled, dropped failing patches before the
#: features were made; no slide-level QC verdict is recorded).
QC_OK = "ok"


def slide_view(name: str, slide_path: str | Path, prediction: Prediction, store: Path,
               slide_size: tuple[int, int], settings: HeatmapSettings, *, risk: float,
               qc_status: str = QC_OK, mpp: float | None = None) -> SlideView:
    """The worklist's view of one slide: grade, risk and a patch-resolution heatmap.

    ``name`` is what the pages call the slide (its id or pseudonym); ``slide_path`` is only
    read for pyramid pixels; ``slide_size`` is the slide's level-0 (width, height); ``mpp``
    the µm/px to open it with (``None``: the file's own).
    """
    scores = load_scores(store, prediction, settings)
    width, height = slide_size
    downsample = float(scores.grid.get("step_level0") or scores.footprint)
    raster = render_slide([scores.patch_set()], math.ceil(width / downsample),
                          math.ceil(height / downsample), downsample)
    top = [TopPatch(x=p.x, y=p.y, size=p.size, score=p.score, rank=p.rank)
           for p in scores.top(settings.top_k)]
    return SlideView(slide_id=name, slide_path=slide_path, grade=prediction.predicted,
                     risk=risk, probabilities=dict(prediction.probabilities),
                     qc_status=qc_status, heatmap=raster, heatmap_downsample=downsample,
                     legend=scores.normaliser.legend, top_patches=top, mpp=mpp)


def write_views(folder: Path, views: Sequence[SlideView], settings: HeatmapSettings,
                title: str) -> Path:
    """Write the HTML worklist of ``views`` into ``folder`` (replaced as a whole), with the
    heatmap settings' threshold, colormap and opacity; returns its ``index.html``."""
    return write_html_export(folder, views, threshold=settings.threshold,
                             colormap=settings.colormap, title=title,
                             opacity=settings.opacity)


def write_heatmap_worklist(out: Path, entries: Sequence[SlideEntry],
                           results: Sequence[HeatmapResult], predictions_csv: Path,
                           features: Path, settings: HeatmapSettings) -> Path | None:
    """The HTML worklist of a ``slidepipe heatmap`` export folder ``out``, in
    ``out/worklist/``; returns its ``index.html`` (``None``: no slide was exported).

    ``results`` are what :func:`~pipelines.heatmaps.export_heatmaps` returned for ``entries``
    (one per entry, in order); only the exported slides are listed (the failed ones are in
    ``heatmap_summary.csv``), under the names their export folders have (pseudonyms with
    ``pseudonymise``). Grade, probabilities and the triage risk (as ``slidepipe run`` computes
    it, :func:`pipelines.run.predict.risk_score`) come from the predictions CSV; the slide's
    size and µm/px from the ``summary.json`` its exports were made with.
    """
    exported = [(entry, result) for entry, result in zip(entries, results, strict=True)
                if result.status == "ok"]
    if any(result.folder == WORKLIST_DIR for _, result in exported):
        raise ValueError(f"a slide is named {WORKLIST_DIR!r}, the HTML worklist's folder in "
                         f"{out}; rename it or skip the HTML export")
    predictions = read_predictions(predictions_csv)
    views = []
    for entry, result in exported:
        prediction = predictions[entry.slide_id]
        summary = json.loads((out / result.folder / "summary.json").read_text())
        views.append(slide_view(
            result.slide, entry.path, prediction,
            find_store(features, entry.slide_id, prediction.attention),
            (int(summary["slide_width"]), int(summary["slide_height"])), settings,
            risk=risk_score(list(prediction.probabilities.values())),
            mpp=float(summary["slide_mpp"])))
    if not views:
        return None
    return write_views(out / WORKLIST_DIR, views, settings,
                       title=f"slidepipe heatmap: {len(views)} slides")
