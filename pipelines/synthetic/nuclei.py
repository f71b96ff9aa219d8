"""Nuclei of the synthetic slides.

Nuclei live on two rotated, gently warped level-0 cell grids (:class:`CellLayer`); each cell's
nucleus (presence, position, size, shape, orientation, stain) comes from a hash of the cell's
indices. Per-cell parameters are computed in square blocks of cells kept in a :class:`CellCache`,
and :func:`shade_nuclei` turns them into per-pixel coverage and haematoxylin density.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np

from .noise import mix64, uniforms

#: Nucleus cell grid pitch in µm.
CELL_UM: Final = 15.0
_MAX_NUCLEUS_EXTENT: Final = 0.46  # of a cell, so every nucleus stays inside its cell

# Nucleus cells are generated in square blocks of this many cells a side, and this many blocks
# are cached.
_CELL_BLOCK: Final = 32
_MAX_CACHED_BLOCKS: Final = 256

_ROW_KEY: Final = np.uint64(0xD6E8FEB86659FD93)


@dataclass(frozen=True)
class CellLayer:
    """One nucleus cell grid: index (0 all nuclei, 1 lesional only), hash key, rotation and
    four (wavenumber, amplitude, phase) sinusoids warping it, in level-0 pixels."""

    index: int
    key: np.uint64
    cos: float
    sin: float
    waves: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Nuclei:
    """Nuclei of a set of cells: centre offsets and quadratic-form coefficients of the outline
    (``a u² + b u v + c v² = 1``) in cell units, radius (geometric mean of the semi-axes) in µm,
    haematoxylin stain and area as a fraction of a cell."""

    offset_x: np.ndarray
    offset_y: np.ndarray
    quad_a: np.ndarray
    quad_b: np.ndarray
    quad_c: np.ndarray
    radius_um: np.ndarray
    stain: np.ndarray
    area: np.ndarray


def cell_layers(rng: np.random.Generator, seed: int, cell: float) -> tuple[CellLayer, ...]:
    """Two nucleus cell grids of pitch ``cell`` (level-0 px), rotated differently and gently
    warped by separable sinusoids: the first holds every nucleus type, the second only lesional
    nuclei, so that lesions are crowded without looking like a lattice."""
    base_angle = rng.uniform(0, math.pi / 2)
    layers = []
    for index in range(2):
        angle = base_angle + index * rng.uniform(0.45, 0.9)
        waves = tuple(
            (2 * math.pi / (cell * rng.uniform(4.5, 8.0)), 0.16 * cell,
             rng.uniform(0, 2 * math.pi))
            for _ in range(4))
        key = mix64(np.array([seed * 2 + index], dtype=np.uint64))[0]
        layers.append(CellLayer(index, key, math.cos(angle), math.sin(angle), waves))
    return tuple(layers)


def nucleus_shapes(u: np.ndarray, lesional: np.ndarray, fibre_angle: np.ndarray) -> Nuclei:
    """Shapes, positions and stain of nuclei from 8 uniforms per cell (shape (8, n)).

    Normal tissue mixes spindle fibroblasts aligned with the collagen, small round dark
    lymphocytes and ovoid nuclei; lesional nuclei are large, round to oval, pleomorphic and
    randomly oriented.
    """
    kind, size, aspect_u, angle_u, stain_u, jitter_x, jitter_y = u[1:8]
    spindle = kind < 0.55
    lymph = (kind >= 0.55) & (kind < 0.8)
    # normal nuclei: semi-axes (major, minor) in µm
    major = np.where(spindle, 4.2 + 2.2 * size, np.where(lymph, 2.6 + 0.8 * size, 3.0 + 1.5 * size))
    ratio = np.where(spindle, 2.4 + 1.4 * aspect_u, np.where(lymph, 1.0 + 0.15 * aspect_u,
                                                            1.15 + 0.5 * aspect_u))
    angle = np.where(spindle, fibre_angle + 0.35 * (angle_u - 0.5), math.pi * angle_u)
    stain = np.where(spindle, 1.05 + 0.3 * stain_u, np.where(lymph, 1.7 + 0.3 * stain_u,
                                                            1.2 + 0.3 * stain_u))
    # lesional nuclei: pleomorphic, skewed towards large
    les_major = 4.2 + 2.6 * size**0.7
    major = np.where(lesional, les_major, major)
    ratio = np.where(lesional, 1.0 + 0.55 * aspect_u, ratio)
    angle = np.where(lesional, math.pi * angle_u, angle)
    stain = np.where(lesional, 1.45 + 0.55 * stain_u, stain)
    limit = _MAX_NUCLEUS_EXTENT * CELL_UM
    major = np.minimum(major, limit)
    minor = major / ratio
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    ext_x = np.sqrt((major * cos_a) ** 2 + (minor * sin_a) ** 2) / CELL_UM
    ext_y = np.sqrt((major * sin_a) ** 2 + (minor * cos_a) ** 2) / CELL_UM
    room_x = np.maximum(0.5 - ext_x - 0.04, 0.0)
    room_y = np.maximum(0.5 - ext_y - 0.04, 0.0)
    inv_major2 = (CELL_UM / major) ** 2
    inv_minor2 = (CELL_UM / minor) ** 2
    return Nuclei(
        offset_x=0.5 + (2.0 * jitter_x - 1.0) * room_x,
        offset_y=0.5 + (2.0 * jitter_y - 1.0) * room_y,
        quad_a=cos_a**2 * inv_major2 + sin_a**2 * inv_minor2,
        quad_b=2.0 * cos_a * sin_a * (inv_major2 - inv_minor2),
        quad_c=sin_a**2 * inv_major2 + cos_a**2 * inv_minor2,
        radius_um=np.sqrt(major * minor),
        stain=stain,
        area=math.pi * major * minor / CELL_UM**2,
    )


@cache
def expected_nuclei() -> dict[str, tuple[float, float]]:
    """Expected (area fraction of a cell, stain) of ``"normal"`` and ``"lesion"`` nuclei, for
    the coverage rendering used at coarse downsamples; the same for every slide."""
    u = np.random.default_rng(1234).random((8, 4096))
    out = {}
    for name, flag in (("normal", False), ("lesion", True)):
        shapes = nucleus_shapes(u, np.full(u.shape[1], flag), np.zeros(u.shape[1]))
        area = float(shapes.area.mean())
        stain = float((shapes.area * shapes.stain).mean() / area)
        out[name] = (area, stain)
    return out


def cell_samples(layer: CellLayer, i0: int, j0: int, size: int, cell: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hashed randomness of ``layer``'s cells with row index i0..i0+size-1 and column index
    j0..j0+size-1 (row-major): 9 uniforms per cell, shape (9, size²), and the cell centres in
    level-0 px (ignoring the gentle warp)."""
    ii, jj = np.mgrid[i0:i0 + size, j0:j0 + size]
    ii, jj = ii.ravel(), jj.ravel()
    keys = mix64(ii.astype(np.uint64) * _ROW_KEY ^ jj.astype(np.uint64)) ^ layer.key
    u = uniforms(keys, 9)
    c, s = layer.cos, layer.sin
    cu, cv = (jj + 0.5) * cell, (ii + 0.5) * cell
    return u, c * cu + s * cv, -s * cu + c * cv


#: Computes the nucleus parameters of a layer's cells: (layer, i0, j0, size) → a (7, size, size)
#: float32 array of offset x, offset y (cell units), quadratic-form coefficients a, b, c (cell
#: units), radius (level-0 px) and stain (0 where the cell holds no nucleus).
CellFunction = Callable[[CellLayer, int, int, int], np.ndarray]


class CellCache:
    """A bounded, thread-safe cache of blocks of cell parameters (adjacent windows share most of
    their cells); pickled empty."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[CellCache], tuple[()]]:
        """Pickle as a new, empty cache: the lock cannot be pickled and the blocks are rebuilt
        on demand."""
        return CellCache, ()

    def params(self, layer: CellLayer, i0: int, i1: int, j0: int, j1: int,
               compute: CellFunction) -> np.ndarray:
        """(7, n) parameters of the cells with row index i0..i1 and column index j0..j1
        (inclusive, row-major), assembled from blocks that ``compute`` fills on demand."""
        size = _CELL_BLOCK
        out = np.empty((7, i1 - i0 + 1, j1 - j0 + 1), np.float32)
        for bi in range(i0 // size, i1 // size + 1):
            top, bottom = max(i0, bi * size), min(i1, bi * size + size - 1)
            for bj in range(j0 // size, j1 // size + 1):
                left, right = max(j0, bj * size), min(j1, bj * size + size - 1)
                block = self._block(layer, bi, bj, compute)
                out[:, top - i0:bottom - i0 + 1, left - j0:right - j0 + 1] = block[
                    :, top - bi * size:bottom - bi * size + 1,
                    left - bj * size:right - bj * size + 1]
        return out.reshape(7, -1)

    def _block(self, layer: CellLayer, bi: int, bj: int, compute: CellFunction) -> np.ndarray:
        """One block of cell parameters, computed once while it stays cached."""
        key = (layer.index, bi, bj)
        block = self._blocks.get(key)
        if block is None:
            block = compute(layer, bi * _CELL_BLOCK, bj * _CELL_BLOCK, _CELL_BLOCK)
            with self._lock:
                while len(self._blocks) >= _MAX_CACHED_BLOCKS:
                    self._blocks.pop(next(iter(self._blocks)))
                self._blocks[key] = block
        return block


def cell_window(layer: CellLayer, xs: np.ndarray, ys: np.ndarray, cell: float
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Warped cell-grid coordinates (in cells, float32, (h, w)) of the outer product of level-0
    x (w,) and y (h,), and the inclusive range (i0, i1, j0, j1) of cell rows and columns they
    fall in, with one spare cell each side to absorb float32 rounding."""
    c, s = layer.cos, layer.sin
    (k1, a1, p1), (k2, a2, p2), (k3, a3, p3), (k4, a4, p4) = layer.waves
    inv = 1.0 / cell
    # separable: u = ux + uy, v = vx + vy
    ux = (c * xs + a1 * np.sin(k1 * xs + p1)) * inv
    uy = (-s * ys + a2 * np.sin(k2 * ys + p2)) * inv
    vx = (s * xs + a3 * np.sin(k3 * xs + p3)) * inv
    vy = (c * ys + a4 * np.sin(k4 * ys + p4)) * inv
    j0 = math.floor(ux.min() + uy.min()) - 1
    j1 = math.floor(ux.max() + uy.max()) + 1
    i0 = math.floor(vx.min() + vy.min()) - 1
    i1 = math.floor(vx.max() + vy.max()) + 1
    u = ux.astype(np.float32)[None, :] + uy.astype(np.float32)[:, None]
    v = vx.astype(np.float32)[None, :] + vy.astype(np.float32)[:, None]
    return u, v, (i0, i1, j0, j1)


def shade_nuclei(params: np.ndarray, u: np.ndarray, v: np.ndarray,
                 span: tuple[int, int, int, int], d: float, grain: np.ndarray,
                 lesion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (antialiased over the sample footprint ``d``) and haematoxylin density of one
    layer's nuclei at the cell coordinates ``u``, ``v`` given by :func:`cell_window`; ``params``
    are the (7, n) parameters of the cells in its ``span``. ``params``, ``u`` and ``v`` are
    overwritten. ``lesion`` (the per-pixel lesion weight, None far from lesions) adds the
    vesicular chromatin of lesional nuclei. Only cells holding a nucleus are shaded."""
    i0, _, j0, j1 = span
    params[5] *= np.float32(1.0 / (2.0 * max(d, 1.0)))  # radius → edge sharpness
    col = np.floor(u)
    row = np.floor(v)
    u -= col
    v -= row
    index = (row.astype(np.intp) - i0) * (j1 - j0 + 1)
    index += col.astype(np.intp) - j0
    shape = index.shape
    stain = np.take(params[6], index).ravel()
    occupied = stain > 0
    count = int(np.count_nonzero(occupied))
    if count == 0:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    u, v, index, texture = u.ravel(), v.ravel(), index.ravel(), grain.ravel()
    weight = None if lesion is None else lesion.ravel()
    selected = None
    if count < 0.6 * stain.size:
        # most cells are empty: shade only the occupied ones
        selected = np.flatnonzero(occupied)
        u, v, index, stain, texture = (np.take(a, selected)
                                       for a in (u, v, index, stain, texture))
        if weight is not None:
            weight = np.take(weight, selected)
    u -= np.take(params[0], index)
    v -= np.take(params[1], index)
    q = np.take(params[2], index) * u * u
    q += np.take(params[3], index) * u * v
    q += np.take(params[4], index) * v * v
    profile = np.float32(1.0) - q
    profile += np.float32(0.12) * texture  # ragged nuclear outline
    profile *= np.take(params[5], index)
    profile += np.float32(0.5)
    np.clip(profile, 0, 1, out=profile)
    chromatin = np.float32(1.0) + np.float32(0.12) * texture
    if weight is not None:
        # lesional: cleared centre, darker rim and a central nucleolus
        rim = np.minimum(q, np.float32(1.0)) * np.float32(0.5) - np.float32(0.22)
        rim += np.float32(0.15) * texture
        nucleolus = np.clip((np.float32(0.05) - q) * np.float32(50.0), 0, 1)
        rim += np.float32(0.7) * nucleolus
        chromatin += weight * rim
    chromatin *= stain
    if selected is None:
        return profile.reshape(shape), chromatin.reshape(shape)
    cover = np.zeros(shape, np.float32)
    cover.reshape(-1)[selected] = profile
    density = np.zeros(shape, np.float32)
    density.reshape(-1)[selected] = chromatin
    return cover, density
