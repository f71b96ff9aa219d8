"""Streaming writer of pyramidal whole-slide images: Aperio SVS, generic tiled TIFF, OME-TIFF.

Pixels come from a :data:`RegionRenderer` called once per tile, so no level is ever held in
memory. Tiles are JPEG-encoded with imagecodecs and handed to tifffile as pre-compressed bytes;
uniform tiles (blank glass, padding) are encoded once and the bytes reused, which makes a mostly
empty 40k x 40k slide cheap to write. :func:`write_scalar_pyramid` writes single-channel 8-bit
maps (heatmaps) the same way, deflate-compressed.

JPEG colour conventions (both are decoded correctly by OpenSlide, tifffile and tiffslide):

- ``svs``: tiles store RGB components directly (no YCbCr transform, no chroma subsampling) with
  PhotometricInterpretation RGB, as Aperio scanners write them.
- ``tiff`` and ``ome``: tiles are ordinary YCbCr 4:2:0 JPEGs with PhotometricInterpretation YCbCr,
  as libvips and bfconvert write them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import imagecodecs
import numpy as np
import tifffile

RegionRenderer = Callable[[int, int, int, int, float], np.ndarray]
"""``render(x, y, width, height, downsample)`` returns the uint8 RGB array (height, width, 3) of
the region whose top-left corner is (x, y) in the pixel coordinates of the level at
``downsample`` (relative to level 0). The writer only asks for regions inside the level (it
pads edge tiles with white itself); the SVS thumbnail is requested in one call at an integer
downsample that need not be one of the pyramid's."""

SlideFormat = Literal["svs", "tiff", "ome"]

FORMATS: Final = ("svs", "tiff", "ome")

#: First line of every Aperio ImageDescription; OpenSlide and tifffile detect SVS by it.
APERIO_LIBRARY: Final = "Aperio Image Library v12.0.0"

#: Stand-ins for protected health information written into every SVS description, so that
#: de-identification always has something real-looking to strip (and tests can check it did).
STAND_IN_IDENTIFIERS: Final = {
    "Filename": "PATIENT-SECRET-0001",
    "Date": "01/02/25",
    "User": "jane.doe",
}

#: Longest side of the SVS thumbnail page, in pixels.
THUMBNAIL_MAX_SIDE: Final = 1024

#: Associated image names written LZW-compressed (lossless, as Aperio stores the barcode label);
#: every other associated image is JPEG-compressed.
LOSSLESS_ASSOCIATED: Final = frozenset({"label"})

#: Order in which well-known associated images are written after the pyramid.
ASSOCIATED_ORDER: Final = ("label", "macro")

#: Files whose uncompressed pixels exceed this many bytes are written as BigTIFF.
BIGTIFF_RAW_BYTES: Final = 2**31

WHITE: Final = 255

SUBFILE_REDUCED: Final = 1
_SUBFILE_MACRO: Final = 9


@dataclass(frozen=True)
class Level:
    """One pyramid level: its downsample from level 0 and its size in pixels."""

    downsample: int
    width: int
    height: int


@dataclass(frozen=True)
class JpegStyle:
    """How tiles are JPEG-encoded and tagged for one output format."""

    outcolorspace: Literal["RGB", "YCBCR"]
    subsampling: tuple[int, int]

    def tifffile_args(self) -> dict[str, Any]:
        """Keyword arguments that make tifffile tag pre-encoded tiles consistently."""
        return {
            "compression": "jpeg",
            "photometric": "rgb",
            "subsampling": self.subsampling,
            "compressionargs": {"outcolorspace": self.outcolorspace},
        }


APERIO_JPEG: Final = JpegStyle(outcolorspace="RGB", subsampling=(1, 1))
STANDARD_JPEG: Final = JpegStyle(outcolorspace="YCBCR", subsampling=(2, 2))


class TileEncoder:
    """JPEG-encodes tiles, reusing the bytes of uniform (single-colour) tiles."""

    def __init__(self, quality: int, style: JpegStyle) -> None:
        self.quality = quality
        self.style = style
        self._uniform: dict[bytes, bytes] = {}
        self.encoded = 0
        self.reused = 0

    def encode(self, tile: np.ndarray) -> bytes:
        """Return the JPEG bytes of one full-size RGB tile."""
        if not _is_uniform(tile):
            return self._jpeg(tile)
        key = tile[0, 0].tobytes()
        cached = self._uniform.get(key)
        if cached is None:
            cached = self._uniform[key] = self._jpeg(tile)
        else:
            self.reused += 1
        return cached

    def _jpeg(self, tile: np.ndarray) -> bytes:
        self.encoded += 1
        return bytes(
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(tile),
                level=self.quality,
                colorspace="RGB",
                outcolorspace=self.style.outcolorspace,
                subsampling=self.style.subsampling,
            )
        )



def check_geometry(size: tuple[int, int], mpp: float | None, tile_size: int) -> None:
    """Raise ValueError for a size, mpp or tile size no pyramid writer can honour."""
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"size must be two positive integers (width, height), got {size!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive finite number or None, got {mpp!r}")
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")

def _is_uniform(tile: np.ndarray) -> bool:
    """Whether every pixel of a contiguous (h, w, c) tile has the same value.

    Each byte is compared with the byte one pixel earlier: two contiguous slices, no broadcast.
    """
    flat = np.ascontiguousarray(tile).reshape(-1)
    channels = tile.shape[2]
    return bool(np.array_equal(flat[channels:], flat[:-channels]))


def write_pyramid(
    path: str | Path,
    render: RegionRenderer,
    size: tuple[int, int],
    *,
    mpp: float | None,
    fmt: SlideFormat = "svs",
    downsamples: Sequence[int] = (1, 4, 16),
    tile_size: int = 256,
    quality: int = 90,
    associated: Mapping[str, np.ndarray] | None = None,
    objective_power: int | None = 20,
) -> Path:
    """Write a tiled, JPEG-compressed pyramid, streaming one tile at a time.

    Args:
        path: Output file.
        render: Source of pixels, called once per tile (and once for the SVS thumbnail).
        size: Level-0 (width, height) in pixels.
        mpp: µm/px at level 0; ``None`` writes no resolution metadata (tifffile still writes the
            baseline XResolution = YResolution = 1 with ResolutionUnit NONE, which carries no
            physical size).
        fmt: ``"svs"`` (Aperio layout), ``"tiff"`` (one tiled page per level) or ``"ome"``
            (OME-TIFF with the reduced levels in SubIFDs).
        downsamples: Integer downsample of each level, starting with 1, increasing. For
            ``"tiff"``, tifffile (hence tiffslide) only groups pages into one pyramid when
            successive levels differ by one constant factor of 2, 3 or 4.
        tile_size: Tile edge in pixels, a multiple of 16.
        quality: JPEG quality, 1-100.
        associated: SVS only: extra images by name (``"label"``, ``"macro"``, ...), uint8 RGB.
            A thumbnail page is always generated and must not be given.
        objective_power: Scan magnification written as ``AppMag`` (SVS only); ``None`` omits it.

    The file is written next to ``path`` under a ``.partial`` suffix and renamed into place
    when complete, so a failed write never leaves a truncated slide behind.

    Returns:
        The path written.

    Raises:
        ValueError: An argument is out of range, or ``render`` returned a wrongly shaped array.
    """
    images = dict(associated or {})
    _validate(size, mpp, fmt, downsamples, tile_size, quality, images, objective_power)
    levels = pyramid_levels(size, downsamples)
    out = Path(path)
    partial = out.with_name(out.name + ".partial")
    options = {"bigtiff": _needs_bigtiff(levels), "ome": fmt == "ome"}
    try:
        with tifffile.TiffWriter(partial, **options) as writer:
            if fmt == "svs":
                _write_svs(writer, render, levels, tile_size, quality, mpp, objective_power,
                           images)
            elif fmt == "tiff":
                _write_generic(writer, render, levels, tile_size, quality, mpp)
            else:
                _write_ome(writer, render, levels, tile_size, quality, mpp)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def pyramid_levels(size: tuple[int, int], downsamples: Sequence[int]) -> list[Level]:
    """Return the levels of a pyramid; reduced sizes are rounded up so no pixel is lost."""
    width, height = size
    return [Level(int(d), math.ceil(width / d), math.ceil(height / d)) for d in downsamples]


def _validate(
    size: tuple[int, int],
    mpp: float | None,
    fmt: str,
    downsamples: Sequence[int],
    tile_size: int,
    quality: int,
    associated: Mapping[str, np.ndarray],
    objective_power: int | None,
) -> None:
    """Raise ValueError for any argument :func:`write_pyramid` cannot honour."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    check_geometry(size, mpp, tile_size)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if objective_power is not None and objective_power <= 0:
        raise ValueError(f"objective_power must be positive or None, got {objective_power}")
    validate_downsamples(downsamples)
    _validate_associated(associated, fmt)


def validate_downsamples(downsamples: Sequence[int]) -> None:
    """Downsamples must be integers, start with 1 and strictly increase."""
    values = list(downsamples)
    if not values or values[0] != 1:
        raise ValueError(f"downsamples must start with 1, got {values!r}")
    if any(int(d) != d for d in values):
        raise ValueError(f"downsamples must be integers, got {values!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"downsamples must strictly increase, got {values!r}")


def _validate_associated(associated: Mapping[str, np.ndarray], fmt: str) -> None:
    """Associated images are SVS-only, named by one word, and uint8 RGB arrays."""
    if associated and fmt != "svs":
        raise ValueError(f"associated images are only written for fmt='svs', not {fmt!r}")
    for name, image in associated.items():
        if not name or not name.isidentifier() or name == "thumbnail":
            raise ValueError(f"associated image name must be one word other than "
                             f"'thumbnail', got {name!r}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"associated image {name!r} must be uint8 (height, width, 3), "
                             f"got {image.dtype} {image.shape}")
        if min(image.shape[:2]) == 0:
            raise ValueError(f"associated image {name!r} is empty")


def _needs_bigtiff(levels: Sequence[Level]) -> bool:
    """Whether the pyramid is large enough that its offsets may overflow classic TIFF."""
    raw = sum(level.width * level.height * 3 for level in levels)
    return raw > BIGTIFF_RAW_BYTES


def _render_checked(
    render: RegionRenderer, x: int, y: int, w: int, h: int, ds: float
) -> np.ndarray:
    """Call ``render`` and check it returned a uint8 RGB array of the requested shape."""
    region = np.asarray(render(x, y, w, h, ds))
    if region.shape != (h, w, 3) or region.dtype != np.uint8:
        raise ValueError(f"render({x}, {y}, {w}, {h}, {ds}) returned {region.dtype} "
                         f"{region.shape}, expected uint8 {(h, w, 3)}")
    return region


def _pad_tile(region: np.ndarray, tile_size: int) -> np.ndarray:
    """Pad an edge region with white to a full tile."""
    h, w = region.shape[:2]
    if h == tile_size and w == tile_size:
        return region
    tile = np.full((tile_size, tile_size, 3), WHITE, dtype=np.uint8)
    tile[:h, :w] = region
    return tile


def _level_tiles(
    render: RegionRenderer, level: Level, tile_size: int, encoder: TileEncoder
) -> Iterator[bytes]:
    """Yield the encoded tiles of one level in row-major order."""
    for y in range(0, level.height, tile_size):
        h = min(tile_size, level.height - y)
        for x in range(0, level.width, tile_size):
            w = min(tile_size, level.width - x)
            region = _render_checked(render, x, y, w, h, float(level.downsample))
            yield encoder.encode(_pad_tile(region, tile_size))


def _write_level(
    writer: tifffile.TiffWriter,
    render: RegionRenderer,
    level: Level,
    tile_size: int,
    encoder: TileEncoder,
    **tags: Any,
) -> None:
    """Append one tiled level made of pre-encoded JPEG tiles."""
    writer.write(
        _level_tiles(render, level, tile_size, encoder),
        shape=(level.height, level.width, 3),
        dtype=np.uint8,
        tile=(tile_size, tile_size),
        metadata=tags.pop("metadata", None),
        software="slidepipe",
        **encoder.style.tifffile_args(),
        **tags,
    )


def resolution_tags(mpp: float | None, downsample: int) -> dict[str, Any]:
    """XResolution/YResolution in pixels per centimetre for a level, or nothing without mpp."""
    if mpp is None:
        return {}
    per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def _write_generic(
    writer: tifffile.TiffWriter,
    render: RegionRenderer,
    levels: Sequence[Level],
    tile_size: int,
    quality: int,
    mpp: float | None,
) -> None:
    """Generic tiled TIFF: each level a tiled page, reduced levels flagged as such."""
    encoder = TileEncoder(quality, STANDARD_JPEG)
    for index, level in enumerate(levels):
        subfiletype = SUBFILE_REDUCED if index else 0
        _write_level(writer, render, level, tile_size, encoder, subfiletype=subfiletype,
                     **resolution_tags(mpp, level.downsample))


def _ome_metadata(mpp: float | None) -> dict[str, Any]:
    """OME-XML pixel metadata for an RGB image, with physical pixel size when known."""
    metadata: dict[str, Any] = {"axes": "YXS"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm",
                        PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    return metadata


def _write_ome(
    writer: tifffile.TiffWriter,
    render: RegionRenderer,
    levels: Sequence[Level],
    tile_size: int,
    quality: int,
    mpp: float | None,
) -> None:
    """OME-TIFF: level 0 carries the OME-XML; reduced levels go into its SubIFDs."""
    encoder = TileEncoder(quality, STANDARD_JPEG)
    base, *reduced = levels
    _write_level(writer, render, base, tile_size, encoder, subifds=len(reduced),
                 metadata=_ome_metadata(mpp), **resolution_tags(mpp, 1))
    for level in reduced:
        _write_level(writer, render, level, tile_size, encoder, subfiletype=SUBFILE_REDUCED,
                     **resolution_tags(mpp, level.downsample))


def aperio_fields(mpp: float | None, objective_power: int | None) -> str:
    """The ``|key = value`` tail of an Aperio description (AppMag, MPP, stand-in identifiers)."""
    fields: dict[str, str] = {}
    if objective_power is not None:
        fields["AppMag"] = str(objective_power)
    if mpp is not None:
        fields["MPP"] = f"{mpp:.6g}"
    fields.update(STAND_IN_IDENTIFIERS)
    return "".join(f"|{key} = {value}" for key, value in fields.items())


def aperio_level_description(
    base: Level, level: Level, tile_size: int, quality: int, fields: str
) -> str:
    """Aperio description of a tiled level; reduced levels name their size after ``->``."""
    geometry = f"{base.width}x{base.height} [0,0 {base.width}x{base.height}]"
    reduced = "" if level is base else f" -> {level.width}x{level.height}"
    return (f"{APERIO_LIBRARY} \r\n{geometry} ({tile_size}x{tile_size}){reduced} "
            f"JPEG/RGB Q={quality}{fields}")


def _write_svs(
    writer: tifffile.TiffWriter,
    render: RegionRenderer,
    levels: Sequence[Level],
    tile_size: int,
    quality: int,
    mpp: float | None,
    objective_power: int | None,
    associated: Mapping[str, np.ndarray],
) -> None:
    """Aperio layout: level 0, stripped thumbnail, other levels, then associated images."""
    encoder = TileEncoder(quality, APERIO_JPEG)
    fields = aperio_fields(mpp, objective_power)
    base = levels[0]
    for index, level in enumerate(levels):
        description = aperio_level_description(base, level, tile_size, quality, fields)
        _write_level(writer, render, level, tile_size, encoder, description=description)
        if index == 0:
            _write_thumbnail(writer, render, base, quality, fields)
    for name in _associated_order(associated):
        _write_associated(writer, name, associated[name], quality)


def _write_thumbnail(
    writer: tifffile.TiffWriter, render: RegionRenderer, base: Level, quality: int, fields: str
) -> None:
    """Stripped JPEG thumbnail (the second page, which OpenSlide names ``thumbnail``)."""
    downsample = max(1, math.ceil(max(base.width, base.height) / THUMBNAIL_MAX_SIDE))
    width, height = math.ceil(base.width / downsample), math.ceil(base.height / downsample)
    image = _render_checked(render, 0, 0, width, height, float(downsample))
    description = (f"{APERIO_LIBRARY} \r\n{base.width}x{base.height} -> {width}x{height} - "
                   f"{fields}")
    writer.write(image, description=description, metadata=None, software="slidepipe",
                 compressionargs={"level": quality, "outcolorspace": "RGB"},
                 **_stripped_jpeg_args())


def _stripped_jpeg_args() -> dict[str, Any]:
    """tifffile arguments for a stripped RGB-component JPEG page, as Aperio writes them."""
    return {"compression": "jpeg", "photometric": "rgb", "subsampling": (1, 1)}


def _associated_order(associated: Mapping[str, np.ndarray]) -> list[str]:
    """Label first, then macro, then any other names in the order given."""
    known = [name for name in ASSOCIATED_ORDER if name in associated]
    return known + [name for name in associated if name not in ASSOCIATED_ORDER]


def _write_associated(
    writer: tifffile.TiffWriter, name: str, image: np.ndarray, quality: int
) -> None:
    """Stripped associated image whose description's second line OpenSlide takes as its name."""
    height, width = image.shape[:2]
    description = f"{APERIO_LIBRARY} \n{name} {width}x{height}"
    common: dict[str, Any] = {"description": description, "metadata": None,
                              "software": "slidepipe"}
    if name in LOSSLESS_ASSOCIATED:
        writer.write(image, photometric="rgb", compression="lzw", predictor=True,
                     subfiletype=SUBFILE_REDUCED, **common)
        return
    subfiletype = _SUBFILE_MACRO if name == "macro" else SUBFILE_REDUCED
    writer.write(image, subfiletype=subfiletype,
                 compressionargs={"level": quality, "outcolorspace": "RGB"},
                 **_stripped_jpeg_args(), **common)
