"""Deep Zoom (DZI) pyramids of a slide, streamed from its pyramid tile row by tile row.

The full-resolution DZI level shows the slide at ``viewer_mpp`` µm/px: DZI pixel ``i`` covers
level-0 pixels ``[i * s, (i + 1) * s)`` with ``s = DziGeometry.level0_per_pixel``, so a viewer
that places the image ``width * s`` level-0 pixels wide maps its coordinates onto level 0
exactly (heatmaps and patch rectangles land where they belong).

The top DZI level is read once from the best slide pyramid level (area-resampled when the
requested resolution is not a stored level); each coarser DZI level is the 2 x 2 mean of the
level above, as its scanlines arrive. Every level keeps at most one row of tiles plus the
overlap in memory, so memory grows with the slide's width times the tile size, never with its
area. Reads and JPEG encoding run in a thread pool, each thread with its own slide handle.
"""

from __future__ import annotations

import io
import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from wsi import Slide, open_slide

#: Tile side without overlap and overlap on each side: 254 + 2 x 1 = 256 px tiles, the
#: usual Deep Zoom layout (OpenSeadragon blends the overlap, so no seams show).
TILE_SIZE: Final = 254
TILE_OVERLAP: Final = 1
JPEG_QUALITY: Final = 80
#: Default resolution of the viewer's finest level: 1 µm/px (10x) keeps a 40 000 x 40 000 px
#: 0.25 µm/px slide at about 1 700 tiles.
DEFAULT_VIEWER_MPP: Final = 1.0
#: A stored pyramid level whose downsample is within this fraction of the requested one is
#: used as it is (no resampling, sharper and faster).
SNAP_TOLERANCE: Final = 0.05
#: Width of one read from the slide, in top-level DZI pixels.
READ_BLOCK: Final = 4 * TILE_SIZE
#: Tiles queued for encoding per worker before the producer waits.
QUEUED_TILES_PER_WORKER: Final = 16
DZI_NAMESPACE: Final = "http://schemas.microsoft.com/deepzoom/2008"
TILE_FORMAT: Final = "jpg"


@dataclass(frozen=True)
class DziGeometry:
    """Size and tiling of a slide's Deep Zoom pyramid.

    Attributes:
        width: Width of the finest DZI level in pixels.
        height: Height of the finest DZI level in pixels.
        level0_per_pixel: Level-0 pixels per finest-level DZI pixel.
        source_level: The slide pyramid level the finest DZI level is read from.
        source_downsample: That level's downsample (level-0 pixels per level pixel).
        tile_size: Tile side without overlap.
        overlap: Pixels each tile repeats from its neighbours on each side.
    """

    width: int
    height: int
    level0_per_pixel: float
    source_level: int
    source_downsample: float
    tile_size: int = TILE_SIZE
    overlap: int = TILE_OVERLAP

    @property
    def max_level(self) -> int:
        """Index of the finest level; level 0 is 1 x 1 pixel (Deep Zoom convention)."""
        return (max(self.width, self.height) - 1).bit_length()

    @property
    def levels(self) -> range:
        return range(self.max_level + 1)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level``: the finest size halved, rounding up, per level."""
        factor = 1 << (self.max_level - level)
        return -(-self.width // factor), -(-self.height // factor)

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        width, height = self.level_size(level)
        return -(-width // self.tile_size), -(-height // self.tile_size)

    def tile_count(self) -> int:
        """Tiles in the whole pyramid."""
        return sum(cols * rows for cols, rows in map(self.tile_grid, self.levels))

    def tile_box(self, level: int, column: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in ``level`` pixels of a tile, overlap included."""
        width, height = self.level_size(level)
        size, overlap = self.tile_size, self.overlap
        return (max(column * size - overlap, 0), max(row * size - overlap, 0),
                min((column + 1) * size + overlap, width), min((row + 1) * size + overlap, height))

    @property
    def level0_extent(self) -> tuple[float, float]:
        """Level-0 (width, height) the finest level spans (the slide's, to within one DZI
        pixel): the size to give the image in a viewer whose coordinates are level-0 pixels."""
        return self.width * self.level0_per_pixel, self.height * self.level0_per_pixel

    def descriptor(self, tiles_url: str) -> dict[str, object]:
        """The DZI descriptor as the object OpenSeadragon accepts in place of the .dzi XML."""
        return {"Image": {"xmlns": DZI_NAMESPACE, "Url": tiles_url, "Format": TILE_FORMAT,
                          "Overlap": str(self.overlap), "TileSize": str(self.tile_size),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}

    def xml(self) -> str:
        """The ``.dzi`` descriptor file."""
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_NAMESPACE}" '
                f'Format="{TILE_FORMAT}" Overlap="{self.overlap}" TileSize="{self.tile_size}">'
                f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def plan_dzi(slide: Slide, viewer_mpp: float = DEFAULT_VIEWER_MPP, *,
             tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> DziGeometry:
    """The pyramid showing ``slide`` at ``viewer_mpp`` µm/px (never finer than level 0).

    A stored level within :data:`SNAP_TOLERANCE` of the requested resolution is used as is.
    Raises :class:`wsi.MissingResolutionError` for a slide without resolution metadata or
    override.
    """
    if viewer_mpp <= 0:
        raise ValueError(f"viewer_mpp must be positive, got {viewer_mpp}")
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise ValueError(f"need tile_size >= 1 and 0 <= overlap < tile_size, got {tile_size}, "
                         f"{overlap}")
    wanted = max(viewer_mpp / slide.level0_mpp, 1.0)
    level = slide.best_level(wanted, tolerance=SNAP_TOLERANCE)
    source_downsample = float(slide.level_downsamples[level])
    if abs(source_downsample / wanted - 1) <= SNAP_TOLERANCE:
        # the stored level as it is: its pixels are the DZI's, mapped by its downsample
        scale = source_downsample
        width, height = slide.level_dimensions[level]
    else:
        scale = wanted
        # a hair below the exact quotient so that float noise never adds a column of padding
        width, height = (max(1, math.ceil(side / scale - 1e-9)) for side in slide.dimensions)
    return DziGeometry(width=width, height=height, level0_per_pixel=scale, source_level=level,
                       source_downsample=source_downsample, tile_size=tile_size,
                       overlap=overlap)


def read_dzi_region(slide: Slide, geometry: DziGeometry,
                    box: tuple[int, int, int, int]) -> np.ndarray:
    """RGB pixels of the finest DZI level in ``box`` (x0, y0, x1, y1), read from the slide.

    Reads ``geometry.source_level`` and area-resamples the exact footprint when the DZI scale
    is not that level's; outside the slide is white.
    """
    x0, y0, x1, y1 = box
    downsample = geometry.source_downsample
    ratio = geometry.level0_per_pixel / downsample  # source-level pixels per DZI pixel
    if ratio == 1.0:
        return slide.read_region(_level0_location(x0, y0, downsample), geometry.source_level,
                                 (x1 - x0, y1 - y0))
    fx0, fy0, fx1, fy1 = x0 * ratio, y0 * ratio, x1 * ratio, y1 * ratio
    ix0, iy0 = math.floor(fx0), math.floor(fy0)
    ix1, iy1 = math.ceil(fx1), math.ceil(fy1)
    region = slide.read_region(_level0_location(ix0, iy0, downsample), geometry.source_level,
                               (ix1 - ix0, iy1 - iy0))
    resized = Image.fromarray(region).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BOX, box=(fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0))
    return np.asarray(resized)


def _level0_location(x: int, y: int, downsample: float) -> tuple[int, int]:
    """The level-0 location that :meth:`wsi.Slide.read_region` maps to pixel (x, y) of a level
    with ``downsample``: rounding up keeps ``location // downsample`` equal to (x, y)."""
    return math.ceil(x * downsample), math.ceil(y * downsample)


def downsample_2x(rows: np.ndarray) -> np.ndarray:
    """2 x 2 mean of (height, width, 3) uint8 pixels, rounded; an odd last row or column is
    averaged on its own (as if repeated)."""
    return np.asarray(Image.fromarray(rows).reduce(2))


class _TileWriter:
    """Encodes tiles as JPEG on a thread pool and writes them under ``files_dir/<level>/``.

    Uniform tiles (blank glass, padding) are encoded once per colour and size.
    """

    def __init__(self, files_dir: Path, pool: ThreadPoolExecutor, max_queued: int,
                 quality: int) -> None:
        self._files_dir = files_dir
        self._pool = pool
        self._max_queued = max_queued
        self._quality = quality
        self._queued: deque[Future[None]] = deque()
        self._uniform: dict[tuple[int, int, bytes], bytes] = {}
        self._lock = threading.Lock()

    def write(self, level: int, column: int, row: int, tile: np.ndarray) -> None:
        path = self._files_dir / str(level) / f"{column}_{row}.{TILE_FORMAT}"
        self._queued.append(self._pool.submit(self._encode_and_write, path, tile))
        while len(self._queued) > self._max_queued:
            self._queued.popleft().result()

    def wait(self) -> None:
        """Block until every queued tile is on disk; re-raises the first encoding error."""
        while self._queued:
            self._queued.popleft().result()

    def _encode_and_write(self, path: Path, tile: np.ndarray) -> None:
        first = tile[0, 0]
        if (tile == first).all():
            key = (tile.shape[0], tile.shape[1], first.tobytes())
            with self._lock:
                data = self._uniform.get(key)
            if data is None:
                data = self._encode(tile)
                with self._lock:
                    self._uniform[key] = data
        else:
            data = self._encode(tile)
        path.write_bytes(data)

    def _encode(self, tile: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format="JPEG", quality=self._quality)
        return buffer.getvalue()


class _LevelStream:
    """One DZI level fed with its scanlines top to bottom.

    It writes each row of tiles as soon as the rows below it (the overlap) have arrived, drops
    the rows no tile needs any more and feeds the 2 x 2-downsampled scanlines to the next
    coarser level. With ``capture`` it also keeps its whole image (for a small level).
    """

    def __init__(self, geometry: DziGeometry, level: int, tiles: _TileWriter,
                 coarser: _LevelStream | None, capture: bool) -> None:
        self.geometry, self.level = geometry, level
        self.width, self.height = geometry.level_size(level)
        self._tiles, self._coarser = tiles, coarser
        self._buffer = np.empty((0, self.width, 3), np.uint8)
        self._buffer_top = 0  # level row held in _buffer[0]
        self._received = 0
        self._next_tile_row = 0
        self._odd_row: np.ndarray | None = None  # waits for its partner row to downsample
        self._captured: list[np.ndarray] | None = [] if capture else None

    def push(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != (self.width, 3) or self._received + len(rows) > self.height:
            raise AssertionError(f"level {self.level} ({self.width} x {self.height}): got "
                                 f"rows {rows.shape} after {self._received}")
        self._received += len(rows)
        self._buffer = np.concatenate([self._buffer, rows])
        if self._captured is not None:
            self._captured.append(rows)
        self._write_ready_tile_rows()
        if self._coarser is not None:
            self._feed_coarser(rows)

    def finish(self) -> None:
        """Flush after the last scanline (the bottom row repeats when the height is odd)."""
        if self._received != self.height:
            raise AssertionError(f"level {self.level}: got {self._received} of "
                                 f"{self.height} rows")
        if self._coarser is not None:
            if self._odd_row is not None:
                self._coarser.push(downsample_2x(self._odd_row))
                self._odd_row = None
            self._coarser.finish()

    def captured(self) -> np.ndarray | None:
        return None if self._captured is None else np.concatenate(self._captured)

    def _write_ready_tile_rows(self) -> None:
        columns, rows = self.geometry.tile_grid(self.level)
        size, overlap = self.geometry.tile_size, self.geometry.overlap
        while self._next_tile_row < rows:
            row = self._next_tile_row
            _, y0, _, y1 = self.geometry.tile_box(self.level, 0, row)
            if self._received < y1:
                return
            strip = self._buffer[y0 - self._buffer_top: y1 - self._buffer_top]
            for column in range(columns):
                x0, _, x1, _ = self.geometry.tile_box(self.level, column, row)
                self._tiles.write(self.level, column, row, np.ascontiguousarray(strip[:, x0:x1]))
            self._next_tile_row += 1
            keep_from = max((row + 1) * size - overlap, 0)
            if keep_from > self._buffer_top:
                self._buffer = self._buffer[keep_from - self._buffer_top:]
                self._buffer_top = keep_from

    def _feed_coarser(self, rows: np.ndarray) -> None:
        assert self._coarser is not None
        if self._odd_row is not None:
            rows = np.concatenate([self._odd_row, rows])
            self._odd_row = None
        if len(rows) % 2:
            self._odd_row, rows = rows[-1:].copy(), rows[:-1]
        if len(rows):
            self._coarser.push(downsample_2x(rows))


@dataclass
class _ThreadSlides:
    """One slide handle per worker thread (slide libraries are not all thread-safe)."""

    path: str
    backend: str
    mpp: float | None

    def __post_init__(self) -> None:
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()

    def get(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = open_slide(self.path, backend=self.backend, mpp=self.mpp)
            self._local.slide = slide
            with self._lock:
                self._opened.append(slide)
        return slide

    def close(self) -> None:
        for slide in self._opened:
            slide.close()


def write_dzi(slide: Slide, folder: Path, geometry: DziGeometry, *,
              quality: int = JPEG_QUALITY, workers: int = 2,
              thumbnail_side: int = 256) -> np.ndarray:
    """Write ``folder/slide.dzi`` and the tiles ``folder/slide_files/<level>/<col>_<row>.jpg``.

    Only pyramid pixels are read (never label or macro images). Returns the whole image of the
    finest level that fits in ``thumbnail_side`` x ``thumbnail_side`` (for thumbnails).
    """
    files_dir = folder / "slide_files"
    for level in geometry.levels:
        (files_dir / str(level)).mkdir(parents=True, exist_ok=True)
    capture_level = max(level for level in geometry.levels
                        if max(geometry.level_size(level)) <= thumbnail_side)
    readers = _ThreadSlides(slide.path, slide.backend_name, slide.mpp_override)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers),
                                thread_name_prefix="dzi") as pool:
            tiles = _TileWriter(files_dir, pool, QUEUED_TILES_PER_WORKER * max(1, workers),
                                quality)
            streams: dict[int, _LevelStream] = {}
            coarser = None
            for level in geometry.levels:
                coarser = streams[level] = _LevelStream(geometry, level, tiles, coarser,
                                                        capture=level == capture_level)
            _stream_finest_level(geometry, streams[geometry.max_level], pool,
                                 lambda box: read_dzi_region(readers.get(), geometry, box))
            tiles.wait()
    finally:
        readers.close()
    (folder / "slide.dzi").write_text(geometry.xml(), encoding="utf-8")
    thumbnail = streams[capture_level].captured()
    assert thumbnail is not None
    return thumbnail


def _stream_finest_level(geometry: DziGeometry, finest: _LevelStream, pool: ThreadPoolExecutor,
                         read: Callable[[tuple[int, int, int, int]], np.ndarray]) -> None:
    """Read the finest level in strips one tile high (the next strip is read while the current
    one is tiled) and push them down the level chain."""
    strip_height = geometry.tile_size

    def submit(y0: int) -> list[Future[np.ndarray]]:
        y1 = min(y0 + strip_height, geometry.height)
        return [pool.submit(read, (x0, y0, min(x0 + READ_BLOCK, geometry.width), y1))
                for x0 in range(0, geometry.width, READ_BLOCK)]

    starts = range(0, geometry.height, strip_height)
    pending = submit(starts[0])
    for index in range(len(starts)):
        strip = np.concatenate([future.result() for future in pending], axis=1)
        if index + 1 < len(starts):
            pending = submit(starts[index + 1])
        finest.push(strip)
    finest.finish()
