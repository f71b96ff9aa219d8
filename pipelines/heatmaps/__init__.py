"""Heatmap exports from stored attention: overlay PNG, pyramidal TIFF, QuPath GeoJSON, top-k
patch gallery and a JSON summary per slide, for pathologists to see why a slide was graded as
it was. Rendering itself lives in :mod:`mil.heatmap`; nothing here re-runs a model. The HTML
worklist of the exported slides (deep-zoom viewers) is :mod:`pipelines.heatmaps.worklist`,
imported on its own."""

from .pseudonyms import PseudonymError, Pseudonymiser
from .run import (
    SUMMARY_CSV,
    ExtraPatches,
    HeatmapResult,
    SlideHeatmap,
    build_heatmap,
    export_heatmaps,
    export_slide,
    overlay_mpp,
)
from .scores import (
    HeatmapInputError,
    Prediction,
    SlideScores,
    TopPatch,
    find_store,
    load_scores,
    read_predictions,
)
from .settings import HeatmapSettings, HeatmapSettingsError, load_heatmap_settings

__all__ = [
    "SUMMARY_CSV",
    "ExtraPatches",
    "HeatmapInputError",
    "HeatmapResult",
    "HeatmapSettings",
    "HeatmapSettingsError",
    "Prediction",
    "PseudonymError",
    "Pseudonymiser",
    "SlideHeatmap",
    "SlideScores",
    "TopPatch",
    "build_heatmap",
    "export_heatmaps",
    "export_slide",
    "find_store",
    "load_heatmap_settings",
    "load_scores",
    "overlay_mpp",
    "read_predictions",
]
