"""Whole-slide image access: open any slide, find its tissue, lay a patch grid, read patches.

The data flow is ``open_slide`` → ``detect_tissue`` → ``plan_grid``/``build_grid`` →
``PatchReader``; each step returns a plain value that can be stored and resumed.
"""

from .errors import (
    AnnotationError,
    ImplausibleResolutionError,
    MissingResolutionError,
    SlideError,
    SlideOpenError,
    SlideReadError,
)
from .grid_store import load_grid, save_grid
from .qc import PatchQCSettings, measure_patches, qc_keep
from .reader import PatchReader
from .resolution import ResolutionUnavailableError, load_mpp_overrides, lookup_mpp_override
from .slide import Slide, open_slide
from .tiling import GridSettings, GridSpec, TileGrid, build_grid, plan_grid
from .tissue import TissueMask, TissueSettings, detect_tissue

__all__ = [
    "AnnotationError",
    "GridSettings",
    "GridSpec",
    "ImplausibleResolutionError",
    "MissingResolutionError",
    "PatchQCSettings",
    "PatchReader",
    "ResolutionUnavailableError",
    "Slide",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "TileGrid",
    "TissueMask",
    "TissueSettings",
    "build_grid",
    "detect_tissue",
    "load_grid",
    "load_mpp_overrides",
    "lookup_mpp_override",
    "measure_patches",
    "open_slide",
    "plan_grid",
    "qc_keep",
    "save_grid",
]
