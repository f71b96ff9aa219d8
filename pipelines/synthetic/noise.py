"""Hashing and smooth-noise primitives of the synthetic slides.

Every random value of a slide is either a hash of integer indices (:func:`mix64`,
:func:`uniforms`) or a smoothstep-interpolated sample of a precomputed table
(:func:`sample_grid`, :func:`sample_points`), such as the mip levels of a :class:`PeriodicNoise`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
from scipy import ndimage

_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)


def mix64(value: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixing hash of uint64 values."""
    value = (value ^ (value >> np.uint64(30))) * _MIX1
    value = (value ^ (value >> np.uint64(27))) * _MIX2
    return value ^ (value >> np.uint64(31))


def uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` independent uniforms in [0, 1) per uint64 key, shape (count, *keys.shape)."""
    streams = keys[None] + np.arange(1, count + 1, dtype=np.uint64).reshape(
        (count,) + (1,) * keys.ndim) * _GOLDEN
    return (mix64(streams) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _smoothstep(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``floor(coord)`` and the float32 smoothstep weight of the lattice point above it."""
    floor = np.floor(coord)
    frac = coord - floor
    return floor, (frac * frac * (3.0 - 2.0 * frac)).astype(np.float32)


def _axis_weights(coord: np.ndarray, size: int, wrap: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice indices either side of each coordinate and the smoothstep weight of the upper."""
    floor, weight = _smoothstep(coord)
    lower = floor.astype(np.int64)
    if wrap:
        return lower % size, (lower + 1) % size, weight
    return np.clip(lower, 0, size - 1), np.clip(lower + 1, 0, size - 1), weight


def _lattice_rows(floor: np.ndarray, size: int, wrap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lattice indices from ``floor.min()`` to ``floor.max() + 1`` (wrapped or clamped into the
    table) and each coordinate's position in that run."""
    first = int(floor.min())
    rows = np.arange(first, int(floor.max()) + 2)
    rows = rows % size if wrap else np.clip(rows, 0, size - 1)
    return rows, (floor - first).astype(np.intp)


def _run_start(index: np.ndarray) -> int | None:
    """The first value if ``index`` counts up by one, else None."""
    if index.size and index[-1] - index[0] == index.size - 1 and (
            index.size == 1 or bool(np.all(np.diff(index) == 1))):
        return int(index[0])
    return None


def sample_grid(table: np.ndarray, u: np.ndarray, v: np.ndarray, wrap: bool) -> np.ndarray:
    """Interpolate ``table`` on the outer product of column coordinates ``u`` (w,) and row
    coordinates ``v`` (h,), in lattice units; returns (h, w) float32.

    Separable: the lattice rows spanned by ``v`` are interpolated along x, then blended along y,
    so every output value depends on its own (u, v) alone, whatever the window. Coordinates on
    lattice points (zero weights) skip the blending.
    """
    c0, c1, cw = _axis_weights(u, table.shape[1], wrap)
    floor, rw = _smoothstep(v)
    rows, upper = _lattice_rows(floor, table.shape[0], wrap)
    blend_x, blend_y = bool(cw.any()), bool(rw.any())
    if not (blend_x or blend_y):
        start_r, start_c = _run_start(rows[upper]), _run_start(c0)
        if start_r is not None and start_c is not None:
            # lattice-aligned window without wrap-around: a plain copy
            return table[start_r:start_r + len(v), start_c:start_c + len(u)].copy()
    band = table[rows]
    across = band[:, c0]
    if blend_x:
        across += (band[:, c1] - across) * cw
    out = np.take(across, upper, axis=0)
    if blend_y:
        step = np.take(across, upper + 1, axis=0)
        step -= out
        step *= rw[:, None]
        out += step
    return out


def window_range(table: np.ndarray, u: np.ndarray, v: np.ndarray, wrap: bool
                 ) -> tuple[float, float]:
    """Bounds of :func:`sample_grid` over a window: the min and max of the lattice values it
    interpolates between (smoothstep blending is a convex combination)."""
    rows, _ = _lattice_rows(np.floor(v[[0, -1]]), table.shape[0], wrap)
    cols, _ = _lattice_rows(np.floor(u[[0, -1]]), table.shape[1], wrap)
    block = table[np.ix_(rows, cols)]
    return float(block.min()), float(block.max())


def sample_points(table: np.ndarray, u: np.ndarray, v: np.ndarray, wrap: bool) -> np.ndarray:
    """Interpolate ``table`` at arbitrary points (u, v) in lattice units, as
    :func:`sample_grid` does."""
    c0, c1, cw = _axis_weights(u, table.shape[1], wrap)
    r0, r1, rw = _axis_weights(v, table.shape[0], wrap)
    top = table[r0, c0] * (1.0 - cw) + table[r0, c1] * cw
    bottom = table[r1, c0] * (1.0 - cw) + table[r1, c1] * cw
    return top * (1.0 - rw) + bottom * rw


class PeriodicNoise:
    """A smooth, zero-mean, unit-variance periodic random field with box-filtered mip levels.

    Sampled at ``scale`` level-0 pixels per lattice cell; a sample footprint of several cells picks
    the mip level whose cells match it, so coarse renderings see the average of fine ones. With
    ``scale`` 1, level-0 pixel centres fall on lattice points and sampling is a plain lookup.
    """

    def __init__(self, rng: np.random.Generator, size: int = 256, sigma: float = 1.5,
                 octaves: Sequence[tuple[float, float]] = (), amplitude: float = 1.0) -> None:
        """Gaussian-filtered white noise (``sigma`` in lattice cells) normalised to unit
        variance; ``octaves`` adds further (sigma, weight) components, each normalised first;
        the sum is scaled by ``amplitude``."""
        base = np.zeros((size, size))
        for width, weight in ((sigma, 1.0), *octaves):
            part = ndimage.gaussian_filter(rng.standard_normal((size, size)), width, mode="wrap")
            base += weight * amplitude * (part - part.mean()) / part.std()
        self.mips: list[np.ndarray] = [base.astype(np.float32)]
        while self.mips[-1].shape[0] > 2:
            prev = self.mips[-1]
            half = prev.shape[0] // 2
            self.mips.append(prev.reshape(half, 2, half, 2).mean(axis=(1, 3)))
        self.offset = rng.integers(0, size, 2).astype(np.float64)
        #: Largest absolute value of the field at any point, any mip level.
        self.bound = float(np.abs(self.mips[0]).max())

    def _level(self, footprint: float, scale: float) -> tuple[np.ndarray, float]:
        """The mip table for a sample footprint and its cell size in level-0 lattice cells."""
        ratio = footprint / scale
        level = 0 if ratio < 1.5 else min(len(self.mips) - 1, round(math.log2(ratio)))
        return self.mips[level], float(2**level)

    def _coords(self, xs: np.ndarray, ys: np.ndarray, scale: float, cell: float
                ) -> tuple[np.ndarray, np.ndarray]:
        shift = (cell - 1.0) / 2.0
        u = ((np.asarray(xs, np.float64) - 0.5) / scale + self.offset[0] - shift) / cell
        v = ((np.asarray(ys, np.float64) - 0.5) / scale + self.offset[1] - shift) / cell
        return u, v

    def grid(self, xs: np.ndarray, ys: np.ndarray, scale: float, footprint: float) -> np.ndarray:
        """(h, w) float32 field at the outer product of level-0 x (w,) and y (h,)."""
        table, cell = self._level(footprint, scale)
        u, v = self._coords(xs, ys, scale, cell)
        return sample_grid(table, u, v, wrap=True)

    def window_max(self, xs: np.ndarray, ys: np.ndarray, scale: float, footprint: float
                   ) -> float:
        """An upper bound of :meth:`grid` over the window spanned by ``xs`` and ``ys``."""
        table, cell = self._level(footprint, scale)
        u, v = self._coords(xs, ys, scale, cell)
        return window_range(table, u, v, wrap=True)[1]

    def points(self, xs: np.ndarray, ys: np.ndarray, scale: float) -> np.ndarray:
        """Full-detail field at level-0 points (any matching shapes)."""
        u, v = self._coords(xs, ys, scale, 1.0)
        return sample_points(self.mips[0], u, v, wrap=True)
