"""Attention heatmaps from stored patch coordinates and scores, without re-running any model.

Everything here works in level-0 pixels of the slide (the coordinate convention of the feature
stores: top-left ``(x, y)`` of each patch, ``int64``) and is pure numpy/scipy/skimage/matplotlib:

- :class:`PatchSet` holds patches of one footprint, sorted once so the patches that touch a
  window are found with two binary searches; several sets (e.g. coarse patches plus finer ones
  re-extracted inside the top regions) render into one map;
- :func:`render` draws any level-0 window at any downsample into a float32 raster: every patch
  covers its footprint, overlapping patches are averaged (area-weighted sum / count, exact at
  downsample 1), NaN where no patch lies, optionally Gaussian-smoothed (NaN-aware). The map is
  computed on the few *cells* between patch edges inside the window and only then resampled to
  pixels, so memory and time follow the window, never the slide; :func:`render_slide` streams
  a whole slide tile by tile and gives the same raster as one call;
- :func:`render_uint8` gives the 8-bit codes of a window (0 = no data) and recognises uniform
  windows without touching their pixels; :class:`CodeTiles` serves them tile by tile to a
  pyramid writer, computing the cells once per row of tiles (pyramidal TIFF export);
- :func:`threshold_regions` outlines the area at or above a threshold as polygons (with holes)
  in level-0 coordinates.

Scores are brought to [0, 1] and coloured by :mod:`mil.heatmap_scale`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import ndimage, sparse
from skimage import measure

#: 8-bit code of "no patch here"; scores in [0, 1] map to 1..255 (see :func:`to_uint8`).
NO_DATA: Final = 0

#: Gaussian kernels are cut at this many sigmas (scipy's default), which sets the halo.
GAUSSIAN_TRUNCATE: Final = 4.0

#: A pixel counts as covered when patches cover more than this fraction of its area.
MIN_COVERAGE: Final = 1e-9


# -- patches and cells ----------------------------------------------------------------------
class PatchSet:
    """Patches that share one level-0 footprint: top-left ``coords`` (N, 2) and ``scores`` (N,).

    The patches are sorted by y once, so those touching a window are a contiguous run found by
    binary search, filtered on x.
    """

    def __init__(self, coords: np.ndarray, scores: np.ndarray,
                 footprint: int | tuple[int, int]) -> None:
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or not (
                coords.size == 0 or np.issubdtype(coords.dtype, np.integer)):
            raise ValueError(f"coords must be integer level-0 (x, y) of shape (N, 2), got "
                             f"{coords.dtype} {coords.shape}")
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if values.size != coords.shape[0]:
            raise ValueError(f"{values.size} scores for {coords.shape[0]} patches")
        if not np.isfinite(values).all():
            raise ValueError("scores must be finite (no NaN or infinity)")
        width, height = (footprint, footprint) if np.isscalar(footprint) else footprint
        if int(width) != width or int(height) != height or width <= 0 or height <= 0:
            raise ValueError(f"footprint must be positive integer level-0 pixels, "
                             f"got {footprint!r}")
        self.footprint = (int(width), int(height))
        order = np.argsort(coords[:, 1], kind="stable")
        self._x = np.ascontiguousarray(coords[order, 0], dtype=np.int64)
        self._y = np.ascontiguousarray(coords[order, 1], dtype=np.int64)
        self._scores = values[order]

    def __len__(self) -> int:
        return int(self._x.size)

    def intersecting(self, x0: float, y0: float, x1: float, y1: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, score) of the patches overlapping the level-0 window [x0, x1) x [y0, y1)."""
        width, height = self.footprint
        start = int(np.searchsorted(self._y, y0 - height, side="right"))
        stop = int(np.searchsorted(self._y, y1, side="left"))
        xs = self._x[start:stop]
        keep = (xs < x1) & (xs + width > x0)
        return xs[keep], self._y[start:stop][keep], self._scores[start:stop][keep]


@dataclass(frozen=True)
class Cells:
    """A window's map as a piecewise-constant grid: cells between consecutive patch edges.

    ``total`` is the sum of the scores of the patches covering each cell and ``count`` their
    number, so :attr:`values` is the overlap average (NaN where no patch lies).
    """

    x_edges: np.ndarray
    y_edges: np.ndarray
    total: np.ndarray
    count: np.ndarray

    @property
    def values(self) -> np.ndarray:
        """Mean score per cell (Cy, Cx), NaN where no patch covers the cell."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


def window_cells(patch_sets: Sequence[PatchSet], x0: float, y0: float, x1: float, y1: float
                 ) -> Cells:
    """The map of the level-0 window [x0, x1) x [y0, y1) on its patch-edge cells."""
    lefts, rights, tops, bottoms, scores = [], [], [], [], []
    for patches in patch_sets:
        xs, ys, values = patches.intersecting(x0, y0, x1, y1)
        xs, ys = xs.astype(np.float64), ys.astype(np.float64)
        width, height = patches.footprint
        lefts.append(np.clip(xs, x0, x1))
        rights.append(np.clip(xs + width, x0, x1))
        tops.append(np.clip(ys, y0, y1))
        bottoms.append(np.clip(ys + height, y0, y1))
        scores.append(values)
    left, right = np.concatenate([[], *lefts]), np.concatenate([[], *rights])
    top, bottom = np.concatenate([[], *tops]), np.concatenate([[], *bottoms])
    value = np.concatenate([[], *scores])
    x_edges = np.unique(np.concatenate([[x0, x1], left, right]))
    y_edges = np.unique(np.concatenate([[y0, y1], top, bottom]))
    nx, ny = x_edges.size, y_edges.size
    i0, i1 = np.searchsorted(x_edges, left), np.searchsorted(x_edges, right)
    j0, j1 = np.searchsorted(y_edges, top), np.searchsorted(y_edges, bottom)
    corners = np.concatenate([j0 * nx + i0, j0 * nx + i1, j1 * nx + i0, j1 * nx + i1])
    signs = np.concatenate([np.ones_like(value), -np.ones_like(value),
                            -np.ones_like(value), np.ones_like(value)])
    total = np.bincount(corners, weights=signs * np.tile(value, 4), minlength=nx * ny)
    count = np.bincount(corners, weights=signs, minlength=nx * ny)
    total = total.reshape(ny, nx).cumsum(0).cumsum(1)[:-1, :-1]
    count = np.rint(count.reshape(ny, nx).cumsum(0).cumsum(1)[:-1, :-1])
    return Cells(x_edges=x_edges, y_edges=y_edges, total=total, count=count)


def _overlaps(origin: float, size: int, downsample: float, edges: np.ndarray) -> sparse.csr_array:
    """Sparse (size, cells) level-0 length of each output pixel inside each cell along one axis
    (cells lie inside the window, so each touches a short run of pixels)."""
    low = (edges[:-1] - origin) / downsample
    high = (edges[1:] - origin) / downsample
    first = np.clip(np.floor(low), 0, size - 1).astype(np.int64)
    last = np.clip(np.ceil(high) - 1, first, size - 1).astype(np.int64)
    runs = last - first + 1
    cell = np.repeat(np.arange(edges.size - 1), runs)
    starts = np.repeat(np.cumsum(runs) - runs, runs)
    pixel = np.repeat(first, runs) + np.arange(cell.size) - starts
    pixel_low = origin + pixel * downsample
    length = (np.minimum(pixel_low + downsample, edges[cell + 1])
              - np.maximum(pixel_low, edges[cell]))
    return sparse.csr_array((np.maximum(length, 0.0), (pixel, cell)),
                            shape=(size, edges.size - 1))


def _integer_widths(origin: float, size: int, downsample: float, edges: np.ndarray
                    ) -> np.ndarray | None:
    """Pixels per cell when every cell edge falls on a pixel edge (else None)."""
    offsets = (edges - origin) / downsample
    rounded = np.rint(offsets)
    if not np.array_equal(offsets, rounded) or rounded[-1] != size:
        return None
    return np.diff(rounded).astype(np.int64)


def _to_pixels(cells: Cells, x0: float, y0: float, width: int, height: int,
               downsample: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum of score x area, sum of area, covered area) per output pixel, float64 (H, W).

    Areas are in level-0 pixels. When the cell edges fall on pixel edges (always at downsample
    1 from an integer origin) the cells are repeated; otherwise they are area-weighted with two
    sparse matrix products.
    """
    covered = (cells.count > 0).astype(np.float64)
    wx = _integer_widths(x0, width, downsample, cells.x_edges)
    wy = _integer_widths(y0, height, downsample, cells.y_edges)
    if wx is not None and wy is not None:
        area = downsample * downsample

        def expand(grid: np.ndarray) -> np.ndarray:
            return np.repeat(np.repeat(grid, wy, axis=0), wx, axis=1) * area

        return expand(cells.total), expand(cells.count), expand(covered)
    mx = _overlaps(x0, width, downsample, cells.x_edges)
    my = _overlaps(y0, height, downsample, cells.y_edges)

    def resample(grid: np.ndarray) -> np.ndarray:
        return np.asarray(mx @ np.asarray(my @ grid).T).T

    return resample(cells.total), resample(cells.count), resample(covered)


def _check_window(width: int, height: int, downsample: float) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"window size must be positive, got {width} x {height}")
    if not downsample > 0:
        raise ValueError(f"downsample must be positive, got {downsample}")


def halo_pixels(sigma_px: float) -> int:
    """Pixels a window must be widened by on each side to smooth it with ``sigma_px``."""
    return int(GAUSSIAN_TRUNCATE * sigma_px + 0.5) if sigma_px > 0 else 0


def render(patch_sets: Sequence[PatchSet], x0: float, y0: float, width: int, height: int,
           downsample: float, *, sigma_px: float = 0.0) -> np.ndarray:
    """The heatmap of a window as float32 (height, width), NaN where no patch lies.

    Output pixel (row, col) covers level-0 [x0 + col * d, x0 + (col + 1) * d) x (same in y),
    d = ``downsample`` (output µm/px over slide µm/px). Each pixel is the area-weighted mean
    of the patches overlapping it (at d = 1: the sum of the covering scores over their count).
    ``sigma_px`` > 0 smooths with a Gaussian of that sigma in output pixels, NaN-aware
    (normalised convolution weighted by the covered fraction of each pixel), reading patches
    from a halo around the window so that tiles rendered apart match one rendered whole;
    pixels without a patch stay NaN.
    """
    _check_window(width, height, downsample)
    halo = halo_pixels(sigma_px)
    wx0, wy0 = x0 - halo * downsample, y0 - halo * downsample
    w, h = width + 2 * halo, height + 2 * halo
    cells = window_cells(patch_sets, wx0, wy0, wx0 + w * downsample, wy0 + h * downsample)
    total, count, covered = _to_pixels(cells, wx0, wy0, w, h, downsample)
    valid = covered > MIN_COVERAGE * downsample * downsample
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, total / np.where(valid, count, 1.0), 0.0)
    if halo:
        weight = np.minimum(covered / (downsample * downsample), 1.0)
        smoothed = ndimage.gaussian_filter(mean * weight, sigma_px, mode="constant",
                                           truncate=GAUSSIAN_TRUNCATE)
        norm = ndimage.gaussian_filter(weight, sigma_px, mode="constant",
                                       truncate=GAUSSIAN_TRUNCATE)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(valid, smoothed / np.where(valid, norm, 1.0), 0.0)
        mean, valid = mean[halo:-halo, halo:-halo], valid[halo:-halo, halo:-halo]
    return np.where(valid, mean, np.nan).astype(np.float32)


def iter_windows(width: int, height: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(x, y, w, h) output-pixel tiles covering a width x height raster, row by row."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield x, y, min(tile, width - x), min(tile, height - y)


def render_slide(patch_sets: Sequence[PatchSet], width: int, height: int, downsample: float,
                 *, sigma_px: float = 0.0, tile: int = 1024) -> np.ndarray:
    """The whole-slide raster (height, width) at ``downsample`` from level-0 (0, 0), rendered
    tile by tile (working memory bounded by ``tile``; the result is the same as one call)."""
    _check_window(width, height, downsample)
    out = np.empty((height, width), dtype=np.float32)
    for x, y, w, h in iter_windows(width, height, tile):
        out[y:y + h, x:x + w] = render(patch_sets, x * downsample, y * downsample, w, h,
                                       downsample, sigma_px=sigma_px)
    return out


# -- 8-bit codes and colours ------------------------------------------------------------------
def to_uint8(values: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] as 8-bit codes 1..255 (code = 1 + round(score x 254)); NaN → 0."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    codes = 1.0 + np.rint(np.clip(np.where(finite, values, 0.0), 0.0, 1.0) * 254.0)
    return np.where(finite, codes, NO_DATA).astype(np.uint8)


def from_uint8(codes: np.ndarray) -> np.ndarray:
    """The scores of 8-bit codes (inverse of :func:`to_uint8` to within 1/508), NaN for 0."""
    codes = np.asarray(codes)
    return np.where(codes == NO_DATA, np.nan, (codes.astype(np.float32) - 1.0) / 254.0
                    ).astype(np.float32)


def _expand_codes(codes: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray, x0: float,
                  y0: float, width: int, height: int, downsample: float) -> np.ndarray | None:
    """Pixels of a window from the codes of its cells: a broadcast view when uniform, repeated
    cells when the cell edges fall on pixel edges, else None (the caller resamples)."""
    if codes.min() == codes.max():
        return np.broadcast_to(codes.flat[0], (height, width))
    wx = _integer_widths(x0, width, downsample, x_edges)
    wy = _integer_widths(y0, height, downsample, y_edges)
    if wx is None or wy is None:
        return None
    return np.repeat(np.repeat(codes, wy, axis=0), wx, axis=1)


def render_uint8(patch_sets: Sequence[PatchSet], x0: float, y0: float, width: int, height: int,
                 downsample: float) -> np.ndarray:
    """:func:`to_uint8` of the unsmoothed :func:`render` of a window.

    A window whose cells all share one code (no patch edge inside it, or one value throughout)
    is returned as a read-only broadcast view, without any per-pixel work.
    """
    _check_window(width, height, downsample)
    cells = window_cells(patch_sets, x0, y0, x0 + width * downsample, y0 + height * downsample)
    pixels = _expand_codes(to_uint8(cells.values), cells.x_edges, cells.y_edges, x0, y0, width,
                           height, downsample)
    if pixels is None:
        return to_uint8(render(patch_sets, x0, y0, width, height, downsample))
    return pixels


class CodeTiles:
    """8-bit codes of a slide's unsmoothed map, served tile by tile for a pyramid writer.

    ``tiles(x, y, width, height, downsample)`` takes the region in pixels of the level at
    ``downsample`` (the writer's convention) and returns :func:`render_uint8` of it. Tiles are
    asked for row by row, so the cells of a whole row of tiles are computed once and each tile
    only slices them: uniform tiles cost a few microseconds and no pixels.
    """

    def __init__(self, patch_sets: Sequence[PatchSet], level0_size: tuple[int, int]) -> None:
        self.patch_sets = list(patch_sets)
        self.level0_size = level0_size
        self._row: tuple[int, int, float] | None = None
        self._cells: Cells | None = None
        self._codes = np.zeros((0, 0), dtype=np.uint8)

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float
                 ) -> np.ndarray:
        _check_window(width, height, downsample)
        if self._row != (y, height, downsample):
            level_width = -(-self.level0_size[0] // downsample)
            self._cells = window_cells(self.patch_sets, 0.0, y * downsample,
                                       level_width * downsample, (y + height) * downsample)
            self._codes = to_uint8(self._cells.values)
            self._row = (y, height, downsample)
        cells = self._cells
        assert cells is not None
        x0, x1, y0 = x * downsample, (x + width) * downsample, y * downsample
        first = int(np.searchsorted(cells.x_edges, x0, side="right")) - 1
        stop = int(np.searchsorted(cells.x_edges, x1, side="left"))
        x_edges = np.concatenate([[x0], cells.x_edges[first + 1:stop], [x1]])
        pixels = _expand_codes(self._codes[:, first:stop], x_edges, cells.y_edges, x0, y0,
                               width, height, downsample)
        if pixels is None:
            return to_uint8(render(self.patch_sets, x0, y0, width, height, downsample))
        return pixels


# -- threshold regions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A connected area of the raster at or above a threshold, in level-0 pixels.

    ``exterior`` and each of ``holes`` are closed rings (K, 2) of (x, y); ``area`` is the
    exterior's area minus the holes' (level-0 px²); ``mean_score`` and ``max_score`` are over
    the raster pixels of the region.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]
    area: float
    mean_score: float
    max_score: float


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def threshold_regions(raster: np.ndarray, threshold: float = 0.65, downsample: float = 1.0,
                      origin: tuple[float, float] = (0.0, 0.0)) -> list[Region]:
    """Outlines of the raster's area with score >= ``threshold``, largest first.

    Pixels are joined by their edges (4-connectivity); the outlines run along pixel edges
    (through their midpoints at corners) and are mapped to level 0 by ``downsample`` and the
    raster's level-0 ``origin``. NaN never reaches a threshold.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    raster = np.asarray(raster, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        mask = raster >= threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    members = labels[mask] - 1
    scores = raster[mask].astype(np.float64)
    means = np.bincount(members, scores, count) / np.bincount(members, minlength=count)
    maxima = np.full(count, -np.inf)
    np.maximum.at(maxima, members, scores)
    scale = np.array([downsample, downsample], dtype=np.float64)
    shift = np.array(origin, dtype=np.float64)
    regions = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = np.pad(labels[box] == label, 1).astype(np.float32)
        offset = np.array([box[0].start - 1, box[1].start - 1], dtype=np.float64) + 0.5
        rings = [(ring + offset)[:, ::-1] * scale + shift
                 for ring in measure.find_contours(component, 0.5) if len(ring) >= 4]
        if not rings:
            continue
        areas = [_ring_area(ring) for ring in rings]
        outer = int(np.argmax(areas))
        holes = tuple(ring for i, ring in enumerate(rings) if i != outer)
        regions.append(Region(exterior=rings[outer], holes=holes,
                              area=areas[outer] - sum(_ring_area(h) for h in holes),
                              mean_score=float(means[label - 1]),
                              max_score=float(maxima[label - 1])))
    regions.sort(key=lambda region: -region.area)
    return regions
