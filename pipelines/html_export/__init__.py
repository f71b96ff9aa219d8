"""Static HTML export: a triage worklist and one deep-zoom viewer page per slide.

``write_html_export(out_dir, views)`` writes pages that open from the file system in Chromium
and Firefox without a server or network: each slide as a Deep Zoom pyramid in OpenSeadragon
(vendored) with its heatmap as a live layer (threshold, opacity, on/off), the legend and the
top-scoring patches; the worklist sorts and filters in the page.
"""

from .dzi import DEFAULT_VIEWER_MPP, DziGeometry, plan_dzi, read_dzi_region, write_dzi
from .export import write_html_export
from .model import SlideView, TopPatch

__all__ = [
    "DEFAULT_VIEWER_MPP",
    "DziGeometry",
    "SlideView",
    "TopPatch",
    "plan_dzi",
    "read_dzi_region",
    "write_dzi",
    "write_html_export",
]
