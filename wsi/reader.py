"""Fast patch reading: decode each stored tile once and cut patches out of the decoded tiles.

For TIFF-based slides (SVS, generic TIFF, OME-TIFF) the reader reads the compressed tile bytes
itself and decodes them with imagecodecs (libjpeg-turbo, JPEG 2000, LZW, deflate…), keeping
decoded tiles in a small LRU cache: neighbouring patches share tiles. A tile-aligned patch of
an RGB JPEG level is decoded straight into its slot of the batch (no cache entry, no copy), which
keeps ``read_batch`` within a few per cent of the bare decode (see ``benchmarks/read.py``).
Other formats (NDPI, MRXS, DICOM-WSI…) fall back to the slide's
backend ``read_region``. Either way the output is identical to :meth:`wsi.slide.Slide.read_region`
followed by the same resize.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from .errors import SlideReadError
from .fingerprint import is_url
from .slide import Slide
from .tiling import GridSpec

#: Decoded tiles kept per reader; a row of patches shares tiles with the next row, so the cache
#: holds about two tile rows of a 100 000 px wide level.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

#: TIFF compression code of "new-style" JPEG (TIFF technical note 2), the one every SVS uses.
_JPEG = 7
#: TIFF PhotometricInterpretation codes (also imagecodecs' colour-space codes for JPEG).
_RGB = 2
_YCBCR = 6


@dataclass(frozen=True)
class _TiledLevel:
    page: tifffile.TiffPage
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    #: (JPEG colour space, output colour space) for :func:`imagecodecs.jpeg8_decode` when the
    #: tiles are 8-bit RGB JPEG that decode straight into an (h, w, 3) array; else ``None``.
    jpeg_colorspaces: tuple[int | None, int | str | None] | None = None


def _find_tiled_pages(tif: tifffile.TiffFile, slide: Slide) -> dict[int, _TiledLevel]:
    """Map slide levels to RGB tiled TIFF pages of the same size, searching SubIFDs too."""
    candidates = [page for page in tif.pages if isinstance(page, tifffile.TiffPage)]
    for series in tif.series:  # pyramid levels stored as SubIFDs (OME-TIFF) live here
        candidates.extend(level.keyframe for level in series.levels)
    found: dict[int, _TiledLevel] = {}
    for level, (width, height) in enumerate(slide.level_dimensions):
        for page in candidates:
            if (page.is_tiled and page.imagewidth == width and page.imagelength == height
                    and page.samplesperpixel in (3, 4) and page.dtype == np.uint8
                    and page.imagedepth == 1 and page.planarconfig == 1):
                found[level] = _TiledLevel(
                    page=page, width=width, height=height, tile_width=page.tilewidth,
                    tile_height=page.tilelength,
                    tiles_across=-(-width // page.tilewidth),
                    offsets=tuple(page.dataoffsets), bytecounts=tuple(page.databytecounts),
                    jpeg_colorspaces=_direct_jpeg_colorspaces(page))
                break
    return found


def _direct_jpeg_colorspaces(page: tifffile.TiffPage
                             ) -> tuple[int | None, int | str | None] | None:
    """The colour-space arguments tifffile itself passes to the JPEG decoder, when the page's
    tiles are 3-sample 8-bit JPEG (YCbCr, or Aperio's untransformed RGB) that can be decoded by
    :func:`imagecodecs.jpeg8_decode` straight into an output array; else ``None``.

    The rule is tifffile's: YCbCr tiles are converted to RGB; RGB tiles without a JFIF marker
    (Aperio) are declared RGB so libjpeg does not apply a YCbCr transform. Calling the codec
    directly with ``out=`` skips the allocation and copy of every decoded tile; the pixels are
    the same (same codec, same arguments).
    """
    if (page.compression != _JPEG or page.samplesperpixel != 3 or page.extrasamples
            or page.bitspersample != 8 or page.planarconfig != 1):
        return None
    if page.photometric == _YCBCR:
        return None, _RGB
    if page.photometric == _RGB:
        return (None if page.is_jfif else _RGB), _RGB
    return None


class PatchReader:
    """Reads the patches of a grid as uint8 RGB arrays of ``spec.patch_size`` square.

    Use one reader per worker thread; it holds an open file handle and a tile cache.
    """

    def __init__(self, slide: Slide, spec: GridSpec,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.slide = slide
        self.spec = spec
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._tif: tifffile.TiffFile | None = None
        self._level: _TiledLevel | None = None
        self._fd: int | None = None
        if not is_url(slide.path) and slide.path.lower().endswith(
                (".svs", ".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff")):
            self._open_tiff()

    def _open_tiff(self) -> None:
        try:
            tif = tifffile.TiffFile(self.slide.path)
        except (tifffile.TiffFileError, OSError, ValueError):
            return
        level = _find_tiled_pages(tif, self.slide).get(self.spec.level)
        if level is None:
            tif.close()
            return
        self._tif, self._level = tif, level
        self._fd = os.open(self.slide.path, os.O_RDONLY)

    @property
    def uses_tile_decoder(self) -> bool:
        """True when patches come from the stored tiles directly (no backend round trip)."""
        return self._level is not None

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
        if self._fd is not None:
            os.close(self._fd)
        self._tif = self._level = self._fd = None
        self._cache.clear()
        self._cache_bytes = 0

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tiles ------------------------------------------------------------------------------
    def _tile_bytes(self, index: int) -> bytes | None:
        """The compressed bytes of tile ``index``; ``None`` for a tile that was never written."""
        level = self._level
        assert level is not None and self._fd is not None
        offset, count = level.offsets[index], level.bytecounts[index]
        if count == 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SlideReadError(self.slide.path, f"tile {index} of level "
                                 f"{self.spec.level} is cut short; the file is truncated")
        return data

    def _decode_tile_into(self, tile_x: int, tile_y: int, out: np.ndarray) -> None:
        """Write tile (``tile_x``, ``tile_y``) into ``out`` (tile_height, tile_width, 3).

        A cached tile is copied; otherwise an RGB JPEG tile is decoded straight into ``out`` and
        not cached (in a tile-aligned grid every tile belongs to exactly one patch, so caching
        it would cost an allocation and a copy for nothing); other tiles go through the cache.
        """
        level = self._level
        assert level is not None
        cached = self._cache.get((tile_x, tile_y))
        if cached is not None:
            self._cache.move_to_end((tile_x, tile_y))
            out[...] = cached
            return
        if level.jpeg_colorspaces is None:
            out[...] = self._decode_tile(tile_x, tile_y)
            return
        index = tile_y * level.tiles_across + tile_x
        data = self._tile_bytes(index)
        if data is None:
            out.fill(255)
            return
        self._jpeg_decode(index, data, out)

    def _jpeg_decode(self, index: int, data: bytes, out: np.ndarray) -> None:
        """Decode the RGB JPEG tile ``index`` (bytes ``data``) into ``out``."""
        level = self._level
        assert level is not None and level.jpeg_colorspaces is not None
        colorspace, outcolorspace = level.jpeg_colorspaces
        try:
            imagecodecs.jpeg8_decode(data, tables=level.page.jpegtables, colorspace=colorspace,
                                     outcolorspace=outcolorspace, out=out)
        except Exception as error:
            raise SlideReadError(self.slide.path, f"tile {index} of level {self.spec.level} "
                                 f"cannot be decoded ({error}); the file is corrupt") from error

    def _decode_tile(self, tile_x: int, tile_y: int) -> np.ndarray:
        key = (tile_x, tile_y)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        level = self._level
        assert level is not None
        index = tile_y * level.tiles_across + tile_x
        data = self._tile_bytes(index)
        if data is None:
            tile = np.full((level.tile_height, level.tile_width, 3), 255, dtype=np.uint8)
        elif level.jpeg_colorspaces is not None:
            tile = np.empty((level.tile_height, level.tile_width, 3), dtype=np.uint8)
            self._jpeg_decode(index, data, tile)
        else:
            try:
                decoded = level.page.decode(data, index, jpegtables=level.page.jpegtables)[0]
            except Exception as error:
                raise SlideReadError(self.slide.path, f"tile {index} of level {self.spec.level} "
                                     f"cannot be decoded ({error}); the file is corrupt") from error
            tile = np.asarray(decoded).reshape(level.tile_height, level.tile_width, -1)
            if tile.shape[2] == 4:
                rgba = tile
                tile = np.ascontiguousarray(rgba[..., :3])
                if rgba[..., 3].min() < 255:
                    from .slide import composite_on_white

                    tile = composite_on_white(rgba)
        self._cache[key] = tile
        self._cache_bytes += tile.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.nbytes
        return tile

    def _read_from_tiles(self, x: int, y: int, size: int,
                         out: np.ndarray | None = None) -> np.ndarray:
        """``size`` square of the level at level pixel (x, y); outside the image is white.

        Written into ``out`` (size, size, 3) uint8 when given, else into a new array.
        """
        level = self._level
        assert level is not None
        if out is None:
            out = np.empty((size, size, 3), dtype=np.uint8)
        tw, th = level.tile_width, level.tile_height
        if x % tw == 0 and y % th == 0 and size == tw == th and x + size <= level.width \
                and y + size <= level.height:
            self._decode_tile_into(x // tw, y // th, out)
            return out
        x_end, y_end = min(x + size, level.width), min(y + size, level.height)
        if x < 0 or y < 0 or x_end < x + size or y_end < y + size:
            out.fill(255)
        for tile_y in range(max(y, 0) // th, (y_end - 1) // th + 1 if y_end > 0 else 0):
            for tile_x in range(max(x, 0) // tw, (x_end - 1) // tw + 1 if x_end > 0 else 0):
                tile = self._decode_tile(tile_x, tile_y)
                ox, oy = tile_x * tw, tile_y * th
                sx0, sy0 = max(x, ox), max(y, oy)
                sx1, sy1 = min(x_end, ox + tw), min(y_end, oy + th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
        return out

    # -- patches ----------------------------------------------------------------------------
    def read_patch(self, x0: int, y0: int) -> np.ndarray:
        """The patch whose level-0 top-left is (x0, y0), resized to ``spec.patch_size``."""
        spec = self.spec
        if self._level is not None:
            downsample = spec.level_downsample
            patch = self._read_from_tiles(int(x0 // downsample), int(y0 // downsample),
                                          spec.read_size)
        else:
            patch = self.slide.read_region((int(x0), int(y0)), spec.level,
                                           (spec.read_size, spec.read_size))
        if spec.needs_resize:
            patch = np.asarray(Image.fromarray(patch).resize(
                (spec.patch_size, spec.patch_size), Image.Resampling.BILINEAR))
        return patch

    def read_batch(self, coords: np.ndarray) -> np.ndarray:
        """Patches for ``coords`` (B, 2) level-0 (x, y) as (B, patch, patch, 3) uint8.

        Without a resize, patches are assembled (and aligned JPEG tiles decoded) straight into
        the batch, with no intermediate array per patch.
        """
        spec = self.spec
        size = spec.patch_size
        batch = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        pairs = np.asarray(coords).reshape(-1, 2).tolist()
        if self._level is not None and not spec.needs_resize:
            downsample = spec.level_downsample
            for i, (x0, y0) in enumerate(pairs):
                x, y = int(int(x0) // downsample), int(int(y0) // downsample)
                self._read_from_tiles(x, y, size, out=batch[i])
            return batch
        for i, (x0, y0) in enumerate(pairs):
            batch[i] = self.read_patch(int(x0), int(y0))
        return batch

    def iter_batches(self, coords: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Stream ``coords`` in batches; memory is bounded by ``batch_size``."""
        for start in range(0, len(coords), batch_size):
            yield self.read_batch(coords[start:start + batch_size])
