"""Geometry of the synthetic slides: the tissue outline (a signed distance grid) and the
star-shaped lesions placed inside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import numpy as np
from scipy import ndimage

from .spec import SyntheticSlideSpec

#: QuPath classification given to lesion annotations, and its display colour.
LESION_CLASS: Final = "Tumor"
LESION_COLOUR: Final = (200, 0, 0)

#: Width of a lesion's transition band, in µm.
LESION_EDGE_UM: Final = 40.0
_LESION_MARGIN_UM: Final = 40.0  # lesions keep this far inside the tissue outline
_LESION_ANGLES: Final = 4096  # tabulated directions of a lesion outline
_LESION_HARMONICS: Final = 5  # cosine terms of a lesion outline


@dataclass(frozen=True)
class Lesion:
    """A star-shaped lesion: ``r(θ) = radius · (1 + Σ amplitudes[k] · cos((k+2)θ + phases[k]))``
    around (x, y), all in level-0 pixels."""

    x: float
    y: float
    radius: float
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]

    @property
    def max_radius(self) -> float:
        """An upper bound of r(θ)."""
        return self.radius * (1.0 + sum(self.amplitudes))

    @property
    def min_radius(self) -> float:
        """A lower bound of r(θ)."""
        return self.radius * (1.0 - sum(self.amplitudes))

    def boundary_radius(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        """r(θ) for unit direction components, by the angle-addition recurrence."""
        total = np.ones_like(cos_t)
        cos_k, sin_k = cos_t, sin_t
        for amplitude, phase in zip(self.amplitudes, self.phases, strict=True):
            cos_k, sin_k = cos_k * cos_t - sin_k * sin_t, sin_k * cos_t + cos_k * sin_t
            total += np.float32(amplitude * math.cos(phase)) * cos_k
            total -= np.float32(amplitude * math.sin(phase)) * sin_k
        return total * np.float32(self.radius)

    @cached_property
    def _radius_table(self) -> np.ndarray:
        """r(θ) at :data:`_LESION_ANGLES` equally spaced angles from 0, float32."""
        theta = np.arange(_LESION_ANGLES) * (2.0 * math.pi / _LESION_ANGLES)
        return self.boundary_radius(np.cos(theta), np.sin(theta)).astype(np.float32)

    def inside_distance(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """r(θ) − distance from the centre: positive inside, ≈ the distance to the outline.
        r(θ) is looked up at the nearest tabulated angle."""
        theta = np.arctan2(dy, dx)
        theta *= _LESION_ANGLES / (2.0 * math.pi)
        theta += _LESION_ANGLES + 0.5
        index = theta.astype(np.intp)
        index %= _LESION_ANGLES
        return np.take(self._radius_table, index) - np.hypot(dx, dy)

    def inside_distance_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """:meth:`inside_distance` on the outer product of level-0 x (w,) and y (h,): (h, w),
        computed in float32."""
        dx = (xs - self.x).astype(np.float32)[None, :]
        dy = (ys - self.y).astype(np.float32)[:, None]
        return self.inside_distance(dx, dy)

    def polygon(self, n_vertices: int = 256) -> np.ndarray:
        """The outline as an (n_vertices, 2) array of level-0 (x, y) by increasing angle."""
        theta = np.linspace(0.0, 2.0 * math.pi, n_vertices, endpoint=False)
        radius = self.boundary_radius(np.cos(theta), np.sin(theta))
        return np.column_stack([self.x + radius * np.cos(theta), self.y + radius * np.sin(theta)])


def _spread_points(rng: np.random.Generator, count: int, low: float, high: float
                   ) -> list[tuple[float, float]]:
    """``count`` points in [low, high]², kept apart by best-of-several sampling."""
    points: list[tuple[float, float]] = []
    for _ in range(count):
        options = rng.uniform(low, high, (16, 2))
        if points:
            gaps = np.min(np.hypot(options[:, None, 0] - np.array(points)[None, :, 0],
                                   options[:, None, 1] - np.array(points)[None, :, 1]), axis=1)
            best = options[int(np.argmax(gaps))]
        else:
            best = options[0]
        points.append((float(best[0]), float(best[1])))
    return points


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop specks under 2 % of the tissue and fill holes under 0.5 %."""
    total = int(mask.sum())
    if total == 0:
        return mask
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= max(0.02 * total, 1)
    keep[0] = False
    if not keep.any():
        keep[np.argmax(np.r_[0, sizes[1:]])] = True
    mask = keep[labels]
    holes, count = ndimage.label(~mask)
    sizes = np.bincount(holes.ravel(), minlength=count + 1)
    fill = sizes < 0.005 * total
    fill[0] = False
    return mask | fill[holes]


def tissue_sdf(rng: np.random.Generator, spec: SyntheticSlideSpec) -> tuple[np.ndarray, float]:
    """Tissue outline: blobs plus multi-scale noise thresholded at the target coverage, as a
    float32 signed distance grid (level-0 px, positive inside) and its step in level-0 px."""
    step = max(4, math.ceil(max(spec.width, spec.height) / 512))
    ny, nx = math.ceil(spec.height / step) + 2, math.ceil(spec.width / step) + 2
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    gx, gy = gx * step / spec.width, gy * step / spec.height  # 0..1 across the slide
    pieces = spec.n_pieces or int(rng.integers(1, 4))
    field_ = np.zeros((ny, nx))
    centres = _spread_points(rng, pieces, low=0.3, high=0.7)
    for cx, cy in centres:
        angle = rng.uniform(0, math.pi)
        sx, sy = rng.uniform(0.14, 0.24) / math.sqrt(pieces), rng.uniform(0.1, 0.2) / math.sqrt(
            pieces)
        dx, dy = gx - cx, gy - cy
        a = (dx * math.cos(angle) + dy * math.sin(angle)) / sx
        b = (-dx * math.sin(angle) + dy * math.cos(angle)) / sy
        field_ += np.exp(-0.5 * (a * a + b * b))
    scale = max(nx, ny)
    for sigma, amplitude in ((scale / 14, 0.45), (scale / 40, 0.18), (scale / 110, 0.06)):
        noise = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), sigma, mode="reflect")
        field_ += amplitude * noise / max(noise.std(), 1e-12)
    border = np.minimum.reduce([gx, 1 - gx, gy, 1 - gy])
    field_ -= 3.0 * np.clip(1.0 - border / 0.08, 0.0, None) ** 2
    inside_slide = (gx <= 1) & (gy <= 1)
    threshold = np.quantile(field_[inside_slide], 1.0 - spec.tissue_fraction)
    mask = (field_ > threshold) & inside_slide
    mask = _clean_mask(mask)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    sdf = np.where(mask, inside - 0.5, 0.5 - outside) * step
    return ndimage.gaussian_filter(sdf, 0.7).astype(np.float32), float(step)


def place_lesions(rng: np.random.Generator, spec: SyntheticSlideSpec, sdf: np.ndarray,
                  sdf_step: float, px_per_um: float) -> tuple[Lesion, ...]:
    """Put ``spec.n_lesions`` lesions where the tissue (the signed distance grid ``sdf`` with
    step ``sdf_step``) is deep enough to hold them, without overlaps; shrink them when it is
    not."""
    if spec.n_lesions == 0:
        return ()
    margin = _LESION_MARGIN_UM * px_per_um + 2 * sdf_step
    edge = LESION_EDGE_UM * px_per_um
    ys, xs = np.nonzero(sdf > margin)
    depth = sdf[ys, xs]
    cx_all, cy_all = xs * sdf_step, ys * sdf_step
    lesions: list[Lesion] = []
    low, high = (r * px_per_um for r in spec.lesion_radius_um)
    for _ in range(spec.n_lesions):
        amps = tuple(float(rng.uniform(0.3, 1.0) * 0.2 / (k + 2))
                     for k in range(_LESION_HARMONICS))
        phases = tuple(float(rng.uniform(0, 2 * math.pi)) for _ in range(_LESION_HARMONICS))
        bulge = 1.0 + sum(amps)
        radius = rng.uniform(low, high)
        placed = None
        while placed is None:
            need = radius * bulge + margin
            ok = depth > need
            for other in lesions:
                gap = np.hypot(cx_all - other.x, cy_all - other.y)
                ok &= gap > other.max_radius + radius * bulge + edge
            candidates = np.flatnonzero(ok)
            if candidates.size:
                pick = candidates[rng.integers(candidates.size)]
                placed = (float(cx_all[pick]), float(cy_all[pick]))
            elif radius > 0.2 * low:
                radius *= 0.85
            else:
                break
        if placed is None:
            # the tissue cannot hold another lesion this size; shrink into its deepest point
            if depth.size == 0:
                by, bx = np.unravel_index(int(np.argmax(sdf)), sdf.shape)
                placed = (bx * sdf_step, by * sdf_step)
                room = float(sdf.max())
            else:
                free = np.ones(depth.shape, bool)
                for other in lesions:
                    free &= np.hypot(cx_all - other.x, cy_all - other.y) > 1.2 * other.max_radius
                if not free.any():
                    free = np.ones(depth.shape, bool)
                pick = int(np.argmax(np.where(free, depth, -np.inf)))
                placed = (float(cx_all[pick]), float(cy_all[pick]))
                room = float(depth[pick])
            radius = max(room - margin, 0.5 * room, 1.0) / bulge
        lesions.append(Lesion(placed[0], placed[1], float(radius), amps, phases))
    return tuple(lesions)
