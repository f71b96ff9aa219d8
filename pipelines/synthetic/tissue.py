"""Procedural H&E-like tissue: :class:`SyntheticTissue` renders any window of a slide at any
downsample, and gives its ground truth (tissue and lesion masks, lesion outlines)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Final, TypeVar

import numpy as np
from shapely.geometry import Polygon

from wsi.geojson import polygons_to_feature_collection

from .geometry import (
    LESION_CLASS,
    LESION_COLOUR,
    LESION_EDGE_UM,
    Lesion,
    place_lesions,
    tissue_sdf,
)
from .noise import PeriodicNoise, sample_grid, sample_points, window_range
from .nuclei import (
    CELL_UM,
    CellCache,
    CellLayer,
    cell_layers,
    cell_samples,
    cell_window,
    expected_nuclei,
    nucleus_shapes,
    shade_nuclei,
)
from .spec import SyntheticSlideSpec
from .stain import Stain

#: Windows at downsamples up to this are rendered directly; above it they are supersampled...
MAX_DIRECT_DOWNSAMPLE: Final = 4.0
#: ... with at most this many samples per pixel side ...
MAX_SUPERSAMPLE: Final = 4
#: ... until the samples themselves pass this downsample: from there on nuclei become their
#: expected coverage (a smooth field), rendered directly.
MEAN_FIELD_DOWNSAMPLE: Final = 6.0
#: Larger windows are rendered in blocks of this many samples a side.
RENDER_BLOCK: Final = 256

# Morphology, in µm.
_FIBRE_WAVELENGTH_UM: Final = 11.0
_FIBRE_WARP_UM: Final = (28.0, 160.0)  # scales of the two fibre-bending noise fields
_LUMEN_SCALE_UM: Final = 38.0
_STROMA_SCALE_UM: Final = 90.0
_GRAIN_UM: Final = 0.9
_CLEFT_SCALE_UM: Final = 14.0
_RAGGED_SCALE_UM: Final = 5.0
_RAGGED_AMPLITUDE_UM: Final = 5.0

# Nucleus presence and the lumens they line.
_NORMAL_PRESENCE: Final = 0.26
_LESION_PRESENCE: Final = (0.62, 0.55)  # per cell layer: lesional nuclei crowd and overlap
_LINING_PRESENCE: Final = 0.95
_LUMEN_THRESHOLD: Final = 1.55
_LINING_BAND: Final = 0.22  # lumen-field width of the epithelium lining each lumen
_LUMEN_EDGE: Final = 0.04  # lumen-field width of the lumen's own edge

# Collagen: bundles at this fraction of the fibre frequency; mean of the cleft term.
_BUNDLE_FREQUENCY: Final = 0.31
_MEAN_CLEFT: Final = 0.097  # E[max(sin φ − 0.55 − 0.3 n, 0) · clip(0.9 + 0.7 g, 0, 1.6)]

_Field = TypeVar("_Field", float, np.ndarray)


def _pixel_centres(start: int, count: int, downsample: float) -> np.ndarray:
    """Level-0 coordinates of the centres of pixels start..start+count-1 of a grid
    ``downsample`` times coarser than level 0."""
    return (np.arange(start, start + count, dtype=np.float64) + 0.5) * downsample


class SyntheticTissue:
    """Deterministic procedural H&E-like tissue; a :data:`wsi.writer.RegionRenderer`.

    ``tissue(x, y, width, height, downsample)`` returns the uint8 RGB (height, width, 3) window
    whose top-left pixel is (x, y) in the pixel grid of the level at ``downsample``.
    """

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.spec = spec
        self.px_per_um = 1.0 / spec.mpp
        rng = np.random.default_rng([spec.seed, 0x5EED5])
        self._lumen_noise = (PeriodicNoise(rng), PeriodicNoise(rng))
        self._cleft_noise = PeriodicNoise(rng)
        self._ragged_noise = PeriodicNoise(rng)
        self._stroma_noise = PeriodicNoise(rng)
        # pixel-scale grain: one lattice point per level-0 pixel
        self._grain = PeriodicNoise(rng, size=512, sigma=0.7 * self._um(_GRAIN_UM))
        self._stain = Stain(rng)
        self._sdf, self._sdf_step = tissue_sdf(rng, spec)
        self._init_fibres(rng)
        self._cell = self._um(CELL_UM)
        self._layers = cell_layers(rng, spec.seed, self._cell)
        self.lesions: tuple[Lesion, ...] = place_lesions(rng, spec, self._sdf, self._sdf_step,
                                                         self.px_per_um)
        self._mean_nucleus = expected_nuclei()
        self._cells = CellCache()

    # ------------------------------------------------------------------ set-up

    def _um(self, value: float) -> float:
        """µm to level-0 pixels."""
        return value * self.px_per_um

    def _init_fibres(self, rng: np.random.Generator) -> None:
        """Collagen fibres: a sinusoid whose phase is bent by a two-octave noise field (in
        radians), so the local direction wanders by tens of degrees."""
        angle = rng.uniform(0, math.pi)
        k = 2 * math.pi / self._um(_FIBRE_WAVELENGTH_UM)
        self._fibre_k = (k * math.cos(angle), k * math.sin(angle))
        fine, coarse = (self._um(s) for s in _FIBRE_WARP_UM)
        self._fibre_scale = fine
        self._fibre_warp = PeriodicNoise(
            rng, sigma=1.5, octaves=((1.5 * coarse / fine, 2.2 * coarse / fine),),
            amplitude=0.5 * k * fine)

    # ------------------------------------------------------------------ fields

    def _tissue_sdf_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return sample_grid(self._sdf, xs / self._sdf_step, ys / self._sdf_step, wrap=False)

    def _tissue_sdf_points(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return sample_points(self._sdf, xs / self._sdf_step, ys / self._sdf_step, wrap=False)

    def _lesions_near(self, xs: np.ndarray, ys: np.ndarray) -> Iterator[Lesion]:
        """The lesions that may reach the window spanned by the increasing ``xs`` and ``ys``."""
        for lesion in self.lesions:
            # lesional nuclei of cells centred in the edge band reach up to a cell further
            reach = lesion.max_radius + self._um(LESION_EDGE_UM) + 2 * self._cell
            if not (xs[-1] < lesion.x - reach or xs[0] > lesion.x + reach
                    or ys[-1] < lesion.y - reach or ys[0] > lesion.y + reach):
                yield lesion

    def _lesion_depth_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        """Max over lesions of (r(θ) − distance) on the grid, or None when none is near."""
        depth: np.ndarray | None = None
        for lesion in self._lesions_near(xs, ys):
            inside = lesion.inside_distance_grid(xs, ys)
            depth = inside if depth is None else np.maximum(depth, inside)
        return depth

    def _lesion_depth_points(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        depth = np.full(np.shape(xs), -np.inf)
        for lesion in self.lesions:
            depth = np.maximum(depth, lesion.inside_distance(xs - lesion.x, ys - lesion.y))
        return depth

    def _lesion_weight(self, depth: np.ndarray) -> np.ndarray:
        """0 outside, 1 well inside, a linear ramp over the lesion's edge band."""
        edge = self._um(LESION_EDGE_UM)
        return np.clip(0.5 + depth / edge, 0.0, 1.0).astype(np.float32)

    def _lesion_weight_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        """Lesion weight on the grid, or None when no lesion (or lesional nucleus) is near.

        Windows entirely inside (or outside) a lesion's edge band get exact constants without
        evaluating the outline."""
        weight: np.ndarray | None = None
        edge = self._um(LESION_EDGE_UM)
        shape = (len(ys), len(xs))
        for lesion in self._lesions_near(xs, ys):
            far_x = max(abs(xs[0] - lesion.x), abs(xs[-1] - lesion.x))
            far_y = max(abs(ys[0] - lesion.y), abs(ys[-1] - lesion.y))
            near_x = max(xs[0] - lesion.x, lesion.x - xs[-1], 0.0)
            near_y = max(ys[0] - lesion.y, lesion.y - ys[-1], 0.0)
            if lesion.min_radius - math.hypot(far_x, far_y) >= edge / 2 + 1.0:
                this = np.ones(shape, np.float32)
            elif lesion.max_radius - math.hypot(near_x, near_y) <= -edge / 2 - 1.0:
                this = np.zeros(shape, np.float32)
            else:
                this = self._lesion_weight(lesion.inside_distance_grid(xs, ys))
            weight = this if weight is None else np.maximum(weight, this)
        return weight

    def _lumen(self, sample: Callable[[PeriodicNoise, float], _Field]) -> _Field:
        """The lumen field (two octaves of noise) through ``sample(noise, scale)``, which
        samples one octave on a grid, at points or as a window bound."""
        scale = self._um(_LUMEN_SCALE_UM)
        return (sample(self._lumen_noise[0], scale)
                + 0.45 * sample(self._lumen_noise[1], 0.45 * scale))

    def _lumen_grid(self, xs: np.ndarray, ys: np.ndarray, footprint: float) -> np.ndarray:
        return self._lumen(lambda noise, scale: noise.grid(xs, ys, scale, footprint))

    def _lumen_max(self, xs: np.ndarray, ys: np.ndarray, footprint: float) -> float:
        """An upper bound of :meth:`_lumen_grid` over the window."""
        return self._lumen(lambda noise, scale: noise.window_max(xs, ys, scale, footprint))

    def _lumen_points(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self._lumen(lambda noise, scale: noise.points(xs, ys, scale))

    def _fibre_phase_points(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return (self._fibre_k[0] * xs + self._fibre_k[1] * ys
                + self._fibre_warp.points(xs, ys, self._fibre_scale))

    def _presence(self, xs: np.ndarray, ys: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probabilities that a cell of layer 0 and a cell of layer 1 centred at level-0 points
        hold a nucleus, and the lesion weight there."""
        sdf = self._tissue_sdf_points(xs, ys)
        lumen = self._lumen_points(xs, ys)
        lesion = (self._lesion_weight(self._lesion_depth_points(xs, ys)) if self.lesions
                  else np.zeros(np.shape(xs), np.float32))
        lining = lumen > _LUMEN_THRESHOLD - _LINING_BAND
        base = np.where(lining, _LINING_PRESENCE, _NORMAL_PRESENCE)
        first = base * (1 - lesion) + _LESION_PRESENCE[0] * lesion
        second = _LESION_PRESENCE[1] * lesion
        open_tissue = (sdf > 0.3 * self._cell) & (lumen < _LUMEN_THRESHOLD - _LUMEN_EDGE)
        return np.where(open_tissue, first, 0.0), np.where(open_tissue, second, 0.0), lesion

    def _compute_cells(self, layer: CellLayer, i0: int, j0: int, size: int) -> np.ndarray:
        """Nucleus parameters of a block of ``layer``'s cells; a
        :data:`~pipelines.synthetic.nuclei.CellFunction`."""
        u, cx, cy = cell_samples(layer, i0, j0, size, self._cell)
        *presences, lesion = self._presence(cx, cy)
        presence = presences[layer.index]
        lesional = (u[8] < lesion) if layer.index == 0 else np.ones(cx.shape, bool)
        eps = 2.0
        phase_dx = self._fibre_phase_points(cx + eps, cy) - self._fibre_phase_points(cx - eps, cy)
        phase_dy = self._fibre_phase_points(cx, cy + eps) - self._fibre_phase_points(cx, cy - eps)
        # fibres run perpendicular to the phase gradient; angles are taken in the cell frame
        fibre_angle = np.arctan2(phase_dx, -phase_dy) + math.atan2(layer.sin, layer.cos)
        shapes = nucleus_shapes(u, lesional, fibre_angle)
        stain = np.where(u[0] < presence, shapes.stain * self._stain.haem_level, 0.0)
        params = np.stack([shapes.offset_x, shapes.offset_y, shapes.quad_a, shapes.quad_b,
                           shapes.quad_c, shapes.radius_um * self.px_per_um, stain])
        return params.astype(np.float32).reshape(7, size, size)

    # ------------------------------------------------------------------ rendering

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """Render a window; see the class docstring.

        Raises:
            ValueError: An empty window or a downsample that is not positive.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"window must be non-empty, got {width} x {height}")
        if not (math.isfinite(downsample) and downsample > 0):
            raise ValueError(f"downsample must be positive, got {downsample}")
        d = float(downsample)
        factor = 1
        if MAX_DIRECT_DOWNSAMPLE < d <= MAX_SUPERSAMPLE * MEAN_FIELD_DOWNSAMPLE:
            factor = min(MAX_SUPERSAMPLE, math.ceil(d / MAX_DIRECT_DOWNSAMPLE))
        # blocks keep the working set in cache; every pixel is independent of its window
        step = RENDER_BLOCK // factor
        if width <= step and height <= step:
            return self._render_supersampled(x, y, width, height, d, factor)
        out = np.empty((height, width, 3), np.uint8)
        for top in range(0, height, step):
            h = min(step, height - top)
            for left in range(0, width, step):
                w = min(step, width - left)
                out[top:top + h, left:left + w] = self._render_supersampled(
                    x + left, y + top, w, h, d, factor)
        return out

    def _render_supersampled(self, x: int, y: int, width: int, height: int, d: float,
                             factor: int) -> np.ndarray:
        """Average ``factor`` x ``factor`` samples a pixel (a plain render for factor 1)."""
        if factor == 1:
            return self._render(x, y, width, height, d)
        fine = self._render(x * factor, y * factor, width * factor, height * factor, d / factor)
        block = fine.reshape(height, factor, width, factor, 3).astype(np.float32)
        return np.rint(block.mean(axis=(1, 3))).astype(np.uint8)

    def _render(self, x: int, y: int, width: int, height: int, d: float) -> np.ndarray:
        """Point-sample one window at pixel centres; edges are antialiased over d pixels."""
        xs = _pixel_centres(x, width, d)
        ys = _pixel_centres(y, height, d)
        # one pixel-scale grain serves glass noise, stroma and chromatin texture
        grain = self._grain.grid(xs, ys, 1.0, d)
        alpha = self._tissue_alpha(xs, ys, d)
        if alpha is not None and not alpha.any():
            zeros = np.zeros((height, width), np.float32)
            return self._stain.colour(grain, zeros, zeros)
        lesion = self._lesion_weight_grid(xs, ys)
        eosin, haem, open_ = self._stroma(xs, ys, d, grain, lesion)
        if d > MEAN_FIELD_DOWNSAMPLE:
            return self._colour_mean_field(xs, ys, grain, alpha, eosin, haem, open_)
        cover, density = self._nuclei(self._layers[0], xs, ys, d, grain, lesion)
        if alpha is not None:
            eosin *= alpha
            haem *= alpha
        if d <= 1.0:
            # pixel-sized antialiasing: partial coverage dilutes the stain
            nuclear = cover * density
            if lesion is not None:
                cover1, density1 = self._nuclei(self._layers[1], xs, ys, d, grain, lesion)
                nuclear += cover1 * density1
            if open_ is not None:
                nuclear *= open_
            if alpha is not None:
                nuclear *= alpha
            haem += nuclear
            return self._stain.colour(grain, eosin, haem)
        # edges span several level-0 pixels: blend colours as an area average would
        if lesion is not None:
            cover1, density1 = self._nuclei(self._layers[1], xs, ys, d, grain, lesion)
            weight = cover * density + cover1 * density1
            cover += cover1 - cover * cover1
            density = weight / np.maximum(cover, np.float32(1e-6))
        if open_ is not None:
            cover *= open_
        if alpha is not None:
            density *= alpha
        return self._stain.blend(grain, eosin, haem, density, cover)

    def _tissue_alpha(self, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray | None:
        """Tissue coverage of each pixel (1 px ramp at the ragged outline); None when the whole
        window is tissue."""
        step = self._sdf_step
        low, high = window_range(self._sdf, xs / step, ys / step, wrap=False)
        ragged = self._um(_RAGGED_AMPLITUDE_UM)
        reach = ragged * self._ragged_noise.bound + max(d, 1.0) / 2 + 1.0
        if low >= reach:
            return None
        if high <= -reach:
            return np.zeros((len(ys), len(xs)), np.float32)
        sdf = self._tissue_sdf_grid(xs, ys)
        sdf += np.float32(ragged) * self._ragged_noise.grid(xs, ys, self._um(_RAGGED_SCALE_UM), d)
        return np.clip(sdf / np.float32(max(d, 1.0)) + np.float32(0.5), 0, 1)

    def _stroma(self, xs: np.ndarray, ys: np.ndarray, d: float, grain: np.ndarray,
                lesion: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Eosin and background haematoxylin density, and 1 − lumen weight (None when the
        window holds no lumen)."""
        eosin_level = self._stain.eosin_level
        variation = self._stroma_noise.grid(xs, ys, self._um(_STROMA_SCALE_UM), d)
        phase = self._fibre_warp.grid(xs, ys, self._fibre_scale, d)
        phase += np.float32(self._fibre_k[0]) * xs.astype(np.float32)[None, :]
        phase += np.float32(self._fibre_k[1]) * ys.astype(np.float32)[:, None]
        wavelength = self._um(_FIBRE_WAVELENGTH_UM)
        # clefts are about a third of a wavelength wide: they average away sooner
        keep = math.exp(-((3.0 * math.pi * d / wavelength) ** 2) / 6.0)
        keep_bundle = math.exp(-((math.pi * d / (wavelength / _BUNDLE_FREQUENCY)) ** 2) / 6.0)
        # thin pale clefts between collagen bundles, intermittent and broken up by grain
        cleft = np.sin(phase)
        cleft -= np.float32(0.55) + np.float32(0.3) * self._cleft_noise.grid(
            xs, ys, self._um(_CLEFT_SCALE_UM), d)
        np.clip(cleft, 0, None, out=cleft)
        cleft *= np.clip(np.float32(0.9) + np.float32(0.7) * grain, 0, np.float32(1.6))
        cleft = np.float32(_MEAN_CLEFT * (1 - keep)) + np.float32(keep) * cleft
        # broader darker and lighter bundles along the same course
        bundle = np.sin(np.float32(_BUNDLE_FREQUENCY) * phase)
        shade = np.float32(1.0) + np.float32(0.12 * keep_bundle) * bundle
        density = np.float32(1.0) + np.float32(0.16) * variation
        eosin = np.float32(eosin_level) * density * (
            shade - np.float32(0.75) * cleft + np.float32(0.07) * grain)
        haem = np.full_like(eosin, 0.025)
        if lesion is not None:
            # tumour: pale purple-pink cytoplasm instead of collagen
            cyto = np.float32(0.42 * eosin_level / 0.7) * (
                np.float32(1.0) + np.float32(0.1) * grain)
            eosin += lesion * (cyto - eosin)
            haem += lesion * np.float32(0.14)
        lining_start = _LUMEN_THRESHOLD - _LINING_BAND
        # the edge is ~6 level-0 px wide; coarser samples widen it to their own footprint
        gain = 1.0 / (_LUMEN_EDGE * max(d / 6.0, 1.0))
        if self._lumen_max(xs, ys, d) <= min(lining_start, _LUMEN_THRESHOLD - 1.0 / gain) - 1e-3:
            return eosin, haem, None  # exactly what the formulas below give for this window
        lumen = self._lumen_grid(xs, ys, d)
        # epithelium: a denser, slightly purple band of cytoplasm around each lumen
        lining = np.clip((lumen - np.float32(lining_start)) * np.float32(4.0 / _LINING_BAND),
                         0, 1)
        eosin *= np.float32(1.0) + np.float32(0.3) * lining
        haem += np.float32(0.1) * lining
        open_ = np.clip(np.float32(gain) * (np.float32(_LUMEN_THRESHOLD) - lumen), 0, 1)
        lumen_floor = np.float32(0.04)
        eosin *= lumen_floor + (1 - lumen_floor) * open_
        haem *= open_
        return eosin, haem, open_

    def _nuclei(self, layer: CellLayer, xs: np.ndarray, ys: np.ndarray, d: float,
                grain: np.ndarray, lesion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Coverage and haematoxylin density of one layer's nuclei on the grid; see
        :func:`~pipelines.synthetic.nuclei.shade_nuclei`."""
        u, v, span = cell_window(layer, xs, ys, self._cell)
        params = self._cells.params(layer, *span, self._compute_cells)
        return shade_nuclei(params, u, v, span, d, grain, lesion)

    def _colour_mean_field(self, xs: np.ndarray, ys: np.ndarray, grain: np.ndarray,
                           alpha: np.ndarray | None, eosin: np.ndarray, haem: np.ndarray,
                           open_: np.ndarray | None) -> np.ndarray:
        """Coarse rendering: blend stroma and stroma-under-nucleus colours by the expected
        nuclear coverage (nuclei are smaller than the pixels)."""
        gx, gy = np.meshgrid(xs, ys)
        first, second, weight = self._presence(gx, gy)
        if open_ is None:
            open_ = np.ones_like(eosin)
        if alpha is not None:
            eosin = eosin * alpha
            haem = haem * alpha
        area_n, stain_n = self._mean_nucleus["normal"]
        area_l, stain_l = self._mean_nucleus["lesion"]
        normal = first * (1 - weight) * area_n
        lesional = (first * weight + second) * area_l
        cover = normal + lesional
        stain = (normal * stain_n + lesional * stain_l) / np.maximum(cover, 1e-9)
        cover = np.clip(cover, 0, 1).astype(np.float32) * open_
        nuclear = (stain * self._stain.haem_level).astype(np.float32)
        if alpha is not None:
            nuclear *= alpha
        return self._stain.blend(grain, eosin, haem, nuclear, cover)

    # ------------------------------------------------------------------ ground truth

    def _mask_coords(self, mask_downsample: float) -> tuple[np.ndarray, np.ndarray]:
        if mask_downsample <= 0:
            raise ValueError(f"mask_downsample must be positive, got {mask_downsample}")
        w = math.ceil(self.spec.width / mask_downsample)
        h = math.ceil(self.spec.height / mask_downsample)
        return _pixel_centres(0, w, mask_downsample), _pixel_centres(0, h, mask_downsample)

    def tissue_mask(self, mask_downsample: float) -> np.ndarray:
        """Ground-truth tissue at pixel centres of a grid ``mask_downsample`` times coarser than
        level 0; bool (ceil(height / ds), ceil(width / ds)). This is the tissue outline as a
        pathologist would draw it: lumens inside it count as tissue, and the rendered edge is
        ragged by a few µm around it."""
        xs, ys = self._mask_coords(mask_downsample)
        return self._tissue_sdf_grid(xs, ys) > 0

    def lesion_mask(self, mask_downsample: float) -> np.ndarray:
        """Ground-truth lesions on the same grid as :meth:`tissue_mask`."""
        xs, ys = self._mask_coords(mask_downsample)
        mask = np.zeros((len(ys), len(xs)), bool)
        for start in range(0, len(ys), 1024):
            band = ys[start:start + 1024]
            depth = self._lesion_depth_grid(xs, band)
            if depth is not None:
                mask[start:start + len(band)] = depth > 0
        return mask

    @cached_property
    def lesion_polygons_level0(self) -> list[np.ndarray]:
        """Lesion outlines as (N, 2) arrays of level-0 (x, y) pixels."""
        return [lesion.polygon() for lesion in self.lesions]

    def lesion_polygons(self) -> list[Polygon]:
        """Lesion outlines as shapely polygons in level-0 pixels (to 0.01 px)."""
        return [Polygon(np.round(points, 2)) for points in self.lesion_polygons_level0]

    def lesion_feature_collection(self) -> dict:
        """The lesions as a QuPath-style GeoJSON FeatureCollection in level-0 pixels."""
        properties = [{"lesion_index": i, "radius_px": round(lesion.radius, 2),
                       "centre_x": round(lesion.x, 2), "centre_y": round(lesion.y, 2)}
                      for i, lesion in enumerate(self.lesions)]
        return polygons_to_feature_collection(self.lesion_polygons(), LESION_CLASS,
                                              color=LESION_COLOUR, properties=properties)
