"""Streaming writer of single-channel 8-bit pyramidal TIFFs (score maps such as heatmaps).

The same streaming scheme as :mod:`wsi.writer` (one render call per tile, pre-compressed tiles
handed to tifffile, uniform tiles encoded once), with deflate instead of JPEG so the values
survive exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from .writer import (
    BIGTIFF_RAW_BYTES,
    SUBFILE_REDUCED,
    Level,
    check_geometry,
    pyramid_levels,
    resolution_tags,
    validate_downsamples,
)

ScalarRenderer = Callable[[int, int, int, int, float], np.ndarray]
"""Like :data:`RegionRenderer`, but returns uint8 (height, width) single-channel values. A
uniform region may be returned as a broadcast view (zero strides): it is recognised without
reading its pixels."""


class DeflateTileEncoder:
    """Deflate-compresses single-channel tiles, encoding each uniform value once."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._uniform: dict[int, bytes] = {}
        self.encoded = 0
        self.reused = 0

    def encode(self, tile: np.ndarray) -> bytes:
        """Return the deflate bytes of one full-size (tile, tile) uint8 tile."""
        value = _uniform_value(tile)
        if value is None:
            self.encoded += 1
            return bytes(imagecodecs.zlib_encode(np.ascontiguousarray(tile), level=self.level))
        cached = self._uniform.get(value)
        if cached is None:
            self.encoded += 1
            cached = self._uniform[value] = bytes(imagecodecs.zlib_encode(
                np.ascontiguousarray(tile), level=self.level))
        else:
            self.reused += 1
        return cached


def _uniform_value(tile: np.ndarray) -> int | None:
    """The value of a uniform 2-D tile (a zero-stride view is uniform by construction)."""
    if tile.strides == (0, 0):
        return int(tile.flat[0])
    flat = np.ascontiguousarray(tile).reshape(-1)
    return int(flat[0]) if np.array_equal(flat[1:], flat[:-1]) else None


def scalar_downsamples(size: tuple[int, int], tile_size: int, factor: int = 4) -> list[int]:
    """1, factor, factor², … until the coarsest level fits in one tile."""
    downsamples = [1]
    while max(size) / downsamples[-1] > tile_size:
        downsamples.append(downsamples[-1] * factor)
    return downsamples


def write_scalar_pyramid(
    path: str | Path,
    render: ScalarRenderer,
    size: tuple[int, int],
    *,
    mpp: float | None,
    downsamples: Sequence[int] | None = None,
    tile_size: int = 256,
    fill: int = 0,
    deflate_level: int = 1,
) -> Path:
    """Write a tiled, deflate-compressed, single-channel uint8 generic TIFF pyramid.

    OpenSlide (generic tiled TIFF), tiffslide and QuPath open it with level 0 of exactly
    ``size``; ``mpp`` goes into the resolution tags (pixels per centimetre). Tiles are rendered
    one at a time (reduced levels by ``render`` too, never by reading level 0 back), edge tiles
    are padded with ``fill``, and uniform tiles are compressed once per value and their bytes
    reused, so a mostly uniform map of a 40k x 40k slide takes a fraction of a second. The
    file is written under a ``.partial`` name and renamed into place when complete.

    ``downsamples`` default to powers of 4 down to a level that fits in one tile (tifffile and
    tiffslide group generic pages into one pyramid only for a constant factor).
    """
    check_geometry(size, mpp, tile_size)
    if not 0 <= fill <= 255 or not 0 <= deflate_level <= 9:
        raise ValueError(f"fill must be 0-255 and deflate_level 0-9, got {fill}, "
                         f"{deflate_level}")
    values = list(downsamples) if downsamples is not None else scalar_downsamples(size,
                                                                                  tile_size)
    validate_downsamples(values)
    levels = pyramid_levels(size, values)
    encoder = DeflateTileEncoder(deflate_level)
    out = Path(path)
    partial = out.with_name(out.name + ".partial")
    try:
        with tifffile.TiffWriter(partial, bigtiff=sum(lv.width * lv.height for lv in levels)
                                 > BIGTIFF_RAW_BYTES) as writer:
            for index, level in enumerate(levels):
                writer.write(
                    _scalar_tiles(render, level, tile_size, fill, encoder),
                    shape=(level.height, level.width), dtype=np.uint8,
                    tile=(tile_size, tile_size), compression="zlib",
                    photometric="minisblack", subfiletype=SUBFILE_REDUCED if index else 0,
                    metadata=None, software="slidepipe",
                    **resolution_tags(mpp, level.downsample))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _scalar_tiles(render: ScalarRenderer, level: Level, tile_size: int, fill: int,
                  encoder: DeflateTileEncoder) -> Iterator[bytes]:
    """Yield the encoded single-channel tiles of one level in row-major order."""
    for y in range(0, level.height, tile_size):
        h = min(tile_size, level.height - y)
        for x in range(0, level.width, tile_size):
            w = min(tile_size, level.width - x)
            region = np.asarray(render(x, y, w, h, float(level.downsample)))
            if region.shape != (h, w) or region.dtype != np.uint8:
                raise ValueError(f"render({x}, {y}, {w}, {h}, {level.downsample}) returned "
                                 f"{region.dtype} {region.shape}, expected uint8 {(h, w)}")
            if (h, w) != (tile_size, tile_size):
                padded = np.full((tile_size, tile_size), fill, dtype=np.uint8)
                padded[:h, :w] = region
                region = padded
            yield encoder.encode(region)
