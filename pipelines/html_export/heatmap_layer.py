"""The heatmap as the viewer's layer: an 8-bit PNG of the scores and a colormap table.

The page colours the PNG itself (grey value = round(score x 255), alpha 0 = no data), so the
threshold, colormap and opacity stay live in the browser without a server.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib import colormaps
from PIL import Image


class HeatmapExtentError(ValueError):
    """The heatmap raster does not cover the slide's level-0 extent."""


def score_png(heatmap: np.ndarray) -> bytes:
    """PNG (grey + alpha) of a float (H, W) score raster in [0, 1]; NaN becomes transparent."""
    valid = np.isfinite(heatmap)
    grey = np.round(np.clip(np.where(valid, heatmap, 0.0), 0.0, 1.0) * 255).astype(np.uint8)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(buffer, format="PNG",
                                                              optimize=True)
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    """A ``data:`` URL of PNG bytes. Pages decode the heatmap from it: pixels of an image read
    from a ``file://`` URL cannot be read back by page scripts, those of a data URL can."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def colormap_table(name: str) -> list[list[int]]:
    """The 256 RGB colours of the matplotlib colormap ``name`` (score byte -> colour)."""
    try:
        cmap = colormaps[name]
    except KeyError:
        known = ", ".join(sorted(n for n in colormaps if not n.endswith("_r"))[:12])
        raise ValueError(f"unknown colormap {name!r}; use a matplotlib colormap name such as "
                         f"{known}, …") from None
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(int).tolist()


def check_extent(shape: tuple[int, int], downsample: float,
                 slide_size: tuple[int, int]) -> None:
    """The raster (H, W) at ``downsample`` must span the slide's level-0 (width, height) to
    within one raster pixel; raises :class:`HeatmapExtentError` otherwise."""
    height, width = shape
    covered = (width * downsample, height * downsample)
    for axis, have, need in zip("xy", covered, slide_size, strict=True):
        if abs(have - need) > downsample:
            raise HeatmapExtentError(
                f"the heatmap spans {covered[0]:.0f} x {covered[1]:.0f} level-0 px "
                f"({width} x {height} px at downsample {downsample:g}) but the slide is "
                f"{slide_size[0]} x {slide_size[1]} ({axis} differs by more than one raster "
                "pixel); render the heatmap over the whole slide")
