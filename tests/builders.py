"""Builders of test slides made from the real CMU-1-Small-Region tissue.

Every builder writes into the folder it is given, returns the path it wrote and is
deterministic: the same call writes the same pixels (DICOM instances carry deterministic UIDs
but the converter stamps today's ContentDate). Pixels always come from the real Aperio scan in
``../shared/data`` (mirrored, rotated, tiled), never from synthetic noise, except the blank-glass
slide, which deliberately has no tissue.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import openslide
from PIL import Image

from wsi.writer import write_pyramid

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
REAL_SVS: Final = REPO_ROOT.parent / "shared" / "data" / "CMU-1-Small-Region.svs"

#: µm/px of the real scan, written into every built slide that has a resolution.
REAL_MPP: Final = 0.499
#: (width, height) of the real scan's only level.
REAL_SIZE: Final = (2220, 2967)
WHITE: Final = 255

LARGE_SVS_SIZE: Final = (40960, 40960)
LARGE_SVS_DOWNSAMPLES: Final = (1, 4, 16, 64)
MOSAIC_DOWNSAMPLES: Final = (1, 4, 16)
TILE_SIZE: Final = 256
QUALITY: Final = 90

#: Level-0 positions are snapped to this grid so every level of the pyramid holds them exactly.
POSITION_GRID: Final = 64

#: Downsample of the large slide's macro (overview) image.
MACRO_DOWNSAMPLE: Final = 64

#: The label's dominant colour: saturated magenta, which H&E tissue and glass never show, so a
#: label that leaks into an export or a tile is easy to spot.
LABEL_COLOUR: Final = (255, 0, 255)
LABEL_SIZE: Final = (400, 300)

#: Fraction of the real SVS's bytes kept by :func:`build_truncated_svs`.
TRUNCATED_FRACTION: Final = 0.6

Box = tuple[int, int, int, int]
"""(x, y, width, height) in level-0 pixels."""

_TRANSFORMS: Final[dict[str, Callable[[np.ndarray], np.ndarray]]] = {
    "identity": lambda a: a,
    "fliplr": np.fliplr,
    "flipud": np.flipud,
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
}

#: (column, row, x offset, y offset, transform) of each tissue block on a 3 x 3 grid of cells;
#: offsets are fractions of the slide side. The centre cell stays empty on purpose.
_LAYOUT_SPEC: Final = (
    (0, 0, 0.05, 0.05, "identity"),
    (1, 0, 0.08, 0.02, "fliplr"),
    (2, 0, 0.03, 0.09, "rot90"),
    (0, 1, 0.10, 0.04, "rot270"),
    (2, 1, 0.06, 0.07, "flipud"),
    (0, 2, 0.02, 0.08, "rot180"),
    (1, 2, 0.09, 0.05, "rot90"),
    (2, 2, 0.04, 0.03, "identity"),
)


@cache
def _real_tissue() -> np.ndarray:
    if not REAL_SVS.is_file():
        raise FileNotFoundError(f"real test slide missing: {REAL_SVS} (see ../shared/data)")
    with openslide.OpenSlide(str(REAL_SVS)) as slide:
        rgba = slide.read_region((0, 0), 0, slide.dimensions)
    pixels = np.asarray(rgba.convert("RGB"))
    if pixels.shape[:2] != REAL_SIZE[::-1]:
        raise ValueError(f"{REAL_SVS} is {pixels.shape[1]}x{pixels.shape[0]}, "
                         f"expected {REAL_SIZE[0]}x{REAL_SIZE[1]}")
    pixels.setflags(write=False)
    return pixels


def real_tissue() -> np.ndarray:
    """RGB pixels (2967, 2220, 3) of the real SVS, read once and shared read-only."""
    return _real_tissue()


@cache
def tissue_pixels(kind: str) -> np.ndarray:
    """Read-only pixels of a tissue block: ``"mosaic"`` (see :func:`mosaic_tissue`) or the real
    tissue transformed by ``identity``, ``fliplr``, ``flipud``, ``rot90``, ``rot180``, ``rot270``.
    """
    if kind == "mosaic":
        return mosaic_tissue()
    pixels = np.ascontiguousarray(_TRANSFORMS[kind](real_tissue()))
    pixels.setflags(write=False)
    return pixels


@cache
def mosaic_tissue() -> np.ndarray:
    """A seamless 2 x 2 mirrored mosaic of the real tissue, (5934, 4440, 3)."""
    tissue = real_tissue()
    top = np.hstack([tissue, np.fliplr(tissue)])
    pixels = np.vstack([top, np.flipud(top)])
    pixels.setflags(write=False)
    return pixels


def mosaic_size() -> tuple[int, int]:
    """(width, height) of :func:`mosaic_tissue`."""
    return block_size("mosaic")


@dataclass(frozen=True)
class TissueBlock:
    """Real tissue of one ``kind`` (see :func:`tissue_pixels`) placed at level-0 (x, y)."""

    x: int
    y: int
    kind: str

    def pixels(self) -> np.ndarray:
        """The block's level-0 RGB pixels."""
        return tissue_pixels(self.kind)

    def box(self) -> Box:
        """The block's level-0 (x, y, width, height), known without reading any pixels."""
        width, height = block_size(self.kind)
        return self.x, self.y, width, height


def block_size(kind: str) -> tuple[int, int]:
    """(width, height) of :func:`tissue_pixels` of ``kind``."""
    width, height = REAL_SIZE
    if kind == "mosaic":
        return 2 * width, 2 * height
    if kind not in _TRANSFORMS:
        raise ValueError(f"unknown tissue kind {kind!r}")
    return (height, width) if kind in ("rot90", "rot270") else (width, height)


def tissue_layout(size: tuple[int, int] = LARGE_SVS_SIZE) -> tuple[TissueBlock, ...]:
    """Place eight tissue blocks on a slide of ``size``, separated by white glass.

    Raises:
        ValueError: The slide is too small for the blocks to fit without touching.
    """
    width, height = size
    blocks = tuple(
        TissueBlock(_snap(col * width / 3 + dx * width), _snap(row * height / 3 + dy * height), t)
        for col, row, dx, dy, t in _LAYOUT_SPEC
    )
    _check_layout(blocks, size)
    return blocks


def _snap(value: float) -> int:
    return round(value / POSITION_GRID) * POSITION_GRID


def _check_layout(blocks: Sequence[TissueBlock], size: tuple[int, int]) -> None:
    """Blocks must lie inside the slide and keep a white gap between each other."""
    for block in blocks:
        x, y, w, h = block.box()
        if x + w > size[0] or y + h > size[1]:
            raise ValueError(f"slide {size} too small: block {block.box()} does not fit")
    for a, b in itertools.combinations(blocks, 2):
        if _boxes_touch(a.box(), b.box()):
            raise ValueError(f"slide {size} too small: blocks {a.box()} and {b.box()} touch")


def _boxes_touch(a: Box, b: Box) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax <= bx + bw and bx <= ax + aw and ay <= by + bh and by <= ay + ah


LARGE_SVS_LAYOUT: Final = tissue_layout(LARGE_SVS_SIZE)


def large_svs_boxes(size: tuple[int, int] = LARGE_SVS_SIZE) -> list[Box]:
    """Level-0 boxes of the tissue blocks of :func:`build_large_svs` at ``size``."""
    return [block.box() for block in tissue_layout(size)]


class TissueCanvas:
    """A white slide with tissue blocks on it; a :data:`wsi.writer.RegionRenderer`.

    Each block is box-filtered once per downsample and then pasted into requested regions.
    """

    def __init__(self, size: tuple[int, int], blocks: Sequence[TissueBlock]) -> None:
        self.size = size
        self.blocks = tuple(blocks)
        self._scaled: dict[float, list[tuple[int, int, np.ndarray]]] = {}

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """Render the region (x, y, width, height) of the level at ``downsample``."""
        region = np.full((height, width, 3), WHITE, dtype=np.uint8)
        for bx, by, pixels in self._blocks_at(downsample):
            _paste(region, pixels, bx - x, by - y)
        return region

    def _blocks_at(self, downsample: float) -> list[tuple[int, int, np.ndarray]]:
        scaled = self._scaled.get(downsample)
        if scaled is None:
            scaled = self._scaled[downsample] = [
                _scale_block(block, downsample) for block in self.blocks
            ]
        return scaled


def _scale_block(block: TissueBlock, downsample: float) -> tuple[int, int, np.ndarray]:
    """A block's position and pixels at ``downsample`` (area-averaged)."""
    pixels = block.pixels()
    if downsample == 1:
        return block.x, block.y, pixels
    height, width = pixels.shape[:2]
    target = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    small = np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BOX))
    return round(block.x / downsample), round(block.y / downsample), small


def _paste(region: np.ndarray, pixels: np.ndarray, dx: int, dy: int) -> None:
    """Copy ``pixels`` into ``region`` with its top-left at (dx, dy), clipped to ``region``."""
    height, width = region.shape[:2]
    ph, pw = pixels.shape[:2]
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + pw, width), min(dy + ph, height)
    if x0 < x1 and y0 < y1:
        region[y0:y1, x0:x1] = pixels[y0 - dy:y1 - dy, x0 - dx:x1 - dx]


def synthetic_label() -> np.ndarray:
    """A slide label: magenta card, black barcode bars, a white 'text' box with a green mark."""
    width, height = LABEL_SIZE
    label = np.empty((height, width, 3), dtype=np.uint8)
    label[:] = LABEL_COLOUR
    bars = np.array([(i * 7919) % 5 < 2 for i in range(0, width - 40, 6)])
    for index, dark in enumerate(bars):
        if dark:
            label[20:110, 20 + index * 6:26 + index * 6] = 0
    label[140:280, 20:380] = WHITE
    label[170:250, 40:120] = (0, 200, 0)
    return label


def slide_overview(render: Callable[..., np.ndarray], size: tuple[int, int], ds: int) -> np.ndarray:
    """The whole slide rendered at downsample ``ds``."""
    width, height = math.ceil(size[0] / ds), math.ceil(size[1] / ds)
    return render(0, 0, width, height, float(ds))


def macro_image(overview: np.ndarray) -> np.ndarray:
    """A macro photo: the label (scaled to the overview's height) left of the slide overview."""
    height = overview.shape[0]
    label = Image.fromarray(synthetic_label())
    width = max(1, round(label.width * height / label.height))
    scaled = np.asarray(label.resize((width, height), Image.Resampling.BOX))
    return np.hstack([scaled, overview])


def build_large_svs(folder: Path, size: tuple[int, int] = LARGE_SVS_SIZE) -> Path:
    """A ≥40k x 40k Aperio SVS (levels 1, 4, 16, 64) of real tissue blocks on white glass."""
    return _write_aperio(Path(folder) / "large.svs", TissueCanvas(size, tissue_layout(size)),
                         size, QUALITY)


def _write_aperio(path: Path, canvas: Callable[..., np.ndarray], size: tuple[int, int],
                  quality: int) -> Path:
    """An Aperio SVS of ``canvas`` at levels 1/4/16/64 with a label and a macro image."""
    overview = slide_overview(canvas, size, MACRO_DOWNSAMPLE)
    associated = {"label": synthetic_label(), "macro": macro_image(overview)}
    return write_pyramid(path, canvas, size, mpp=REAL_MPP, fmt="svs",
                         downsamples=LARGE_SVS_DOWNSAMPLES, tile_size=TILE_SIZE,
                         quality=quality, associated=associated)


# -- resection-like slide ------------------------------------------------------------------------
#: Side of one resection block in level-0 pixels: four 256 px tiles, so every block starts on a
#: tile boundary at every level (1024 / 64 = 16 px at the coarsest) and the glass around the
#: tissue is made of whole white tiles, which the writer encodes once and reuses.
RESECTION_BLOCK: Final = 1024
#: JPEG quality of :func:`build_resection_svs`: Aperio scanners write Q=70.
RESECTION_QUALITY: Final = 70

#: Top-left (x, y) of the square crops of the real tissue that the resection is made of: a dense
#: one (about 89 % tissue pixels) and one holding a tear in the tissue (about 66 %).
_RESECTION_CROPS: Final = {"dense": (704, 1920), "torn": (704, 768)}
_RESECTION_TRANSFORMS: Final = ("identity", "fliplr", "flipud", "rot90", "rot180", "rot270")
#: About one block in this many is the torn crop; the others are the dense one.
_RESECTION_TORN_EVERY: Final = 4

#: Tissue pieces of the resection, in fractions of the slide side: centre x, centre y, mean
#: radius, and (amplitude, frequency, phase) of the harmonics of an irregular outline.
_RESECTION_PIECES: Final = (
    (0.40, 0.54, 0.37, ((0.16, 3, 0.4), (0.09, 5, 1.3), (0.05, 8, 2.1))),
    (0.85, 0.16, 0.10, ((0.20, 2, 2.5), (0.08, 5, 0.7))),
)
#: Glass inside the main piece (a lumen): centre x, centre y, radius, fractions of the side.
_RESECTION_LUMEN: Final = (0.45, 0.47, 0.05)


@cache
def resection_block_pixels(crop: str, transform: str) -> np.ndarray:
    """Read-only (1024, 1024, 3) real tissue: crop ``"dense"`` or ``"torn"`` of the real scan
    transformed by one of ``identity``, ``fliplr``, ``flipud``, ``rot90``, ``rot180``,
    ``rot270``."""
    x, y = _RESECTION_CROPS[crop]
    side = RESECTION_BLOCK
    pixels = np.ascontiguousarray(_TRANSFORMS[transform](real_tissue()[y:y + side, x:x + side]))
    pixels.setflags(write=False)
    return pixels


@dataclass(frozen=True)
class ResectionBlock:
    """One 1024 x 1024 block of real tissue (see :func:`resection_block_pixels`) at level-0
    (x, y)."""

    x: int
    y: int
    crop: str
    transform: str

    def pixels(self) -> np.ndarray:
        """The block's level-0 RGB pixels."""
        return resection_block_pixels(self.crop, self.transform)

    def box(self) -> Box:
        """The block's level-0 (x, y, width, height)."""
        return self.x, self.y, RESECTION_BLOCK, RESECTION_BLOCK


def _in_resection(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (fractions of the slide side) lie on the resection's tissue."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for cx, cy, radius, harmonics in _RESECTION_PIECES:
        angle = np.arctan2(v - cy, u - cx)
        outline = radius * (1 + sum(a * np.cos(k * angle + phase) for a, k, phase in harmonics))
        inside |= np.hypot(u - cx, v - cy) <= outline
    lx, ly, lr = _RESECTION_LUMEN
    return inside & (np.hypot(u - lx, v - ly) > lr)


def resection_layout(size: tuple[int, int] = LARGE_SVS_SIZE) -> tuple[ResectionBlock, ...]:
    """The blocks of :func:`build_resection_svs`, row-major: a 1024 px grid over the slide, each
    cell whose centre falls in one of two irregular tissue pieces (one with a lumen of glass)
    holding a block; neighbouring blocks touch edge to edge. Each block's transform, and
    whether it is the torn crop (about one in four), come from a hash of its cell.

    Raises:
        ValueError: The slide is too small to hold any block.
    """
    columns, rows = size[0] // RESECTION_BLOCK, size[1] // RESECTION_BLOCK
    side = RESECTION_BLOCK
    row, column = np.mgrid[0:rows, 0:columns]
    inside = _in_resection((column + 0.5) * side / size[0], (row + 0.5) * side / size[1])
    blocks = []
    for r, c in zip(*np.nonzero(inside), strict=True):
        digest = int.from_bytes(hashlib.sha256(f"resection:{c},{r}".encode()).digest()[:4],
                                "little")
        transform = _RESECTION_TRANSFORMS[digest % len(_RESECTION_TRANSFORMS)]
        crop = "torn" if digest // len(_RESECTION_TRANSFORMS) % _RESECTION_TORN_EVERY == 0 \
            else "dense"
        blocks.append(ResectionBlock(int(c) * side, int(r) * side, crop, transform))
    if not blocks:
        raise ValueError(f"slide {size} too small for a resection of {side} px blocks")
    return tuple(blocks)


def resection_svs_boxes(size: tuple[int, int] = LARGE_SVS_SIZE) -> list[Box]:
    """Level-0 boxes of the tissue blocks of :func:`build_resection_svs` at ``size``."""
    return [block.box() for block in resection_layout(size)]


class ResectionCanvas:
    """A white slide whose tissue is 1024 px blocks on a regular grid; a
    :data:`wsi.writer.RegionRenderer`.

    A region is drawn from the few grid cells it overlaps (found by index, not by scanning all
    blocks). At a downsample that divides 1024 every cell is exact; at any other (the SVS
    thumbnail) cell edges are rounded down and each block is resized to its cell.
    """

    def __init__(self, size: tuple[int, int], blocks: Sequence[ResectionBlock]) -> None:
        self.size = size
        self.blocks = tuple(blocks)
        side = RESECTION_BLOCK
        self._cells: dict[tuple[int, int], ResectionBlock] = {
            (b.x // side, b.y // side): b for b in self.blocks}
        self._scaled: dict[tuple[str, str, int, int], np.ndarray] = {}

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """Render the region (x, y, width, height) of the level at ``downsample``."""
        region = np.full((height, width, 3), WHITE, dtype=np.uint8)
        cell = RESECTION_BLOCK / downsample
        for row in range(int(y // cell), int((y + height) // cell) + 1):
            top, bottom = math.floor(row * cell), math.floor((row + 1) * cell)
            for column in range(int(x // cell), int((x + width) // cell) + 1):
                block = self._cells.get((column, row))
                if block is None:
                    continue
                left, right = math.floor(column * cell), math.floor((column + 1) * cell)
                pixels = self._block_at(block, right - left, bottom - top)
                _paste(region, pixels, left - x, top - y)
        return region

    def _block_at(self, block: ResectionBlock, width: int, height: int) -> np.ndarray:
        key = (block.crop, block.transform, width, height)
        scaled = self._scaled.get(key)
        if scaled is None:
            pixels = block.pixels()
            if (width, height) != (RESECTION_BLOCK, RESECTION_BLOCK):
                pixels = np.asarray(Image.fromarray(pixels).resize(
                    (max(width, 1), max(height, 1)), Image.Resampling.BOX))
            scaled = self._scaled[key] = pixels
        return scaled


def build_resection_svs(folder: Path, size: tuple[int, int] = LARGE_SVS_SIZE,
                        quality: int = RESECTION_QUALITY) -> Path:
    """A large Aperio SVS (levels 1, 4, 16, 64, 0.499 µm/px) like a resection: real tissue
    blocks packed edge to edge over two irregular pieces on about 46 % of the slide (42 % tissue by
    slidepipe's mask; :func:`resection_layout`), JPEG quality 70 as Aperio scanners write,
    label and macro.

    Blocks sit on whole tiles, so all glass tiles are uniform white and encoded once; every
    tile that holds tissue is encoded (the writer only reuses uniform tiles). About 7 s at
    40960 x 40960 on one core.
    """
    return _write_aperio(Path(folder) / "resection.svs",
                         ResectionCanvas(size, resection_layout(size)), size, quality)


def mosaic_canvas() -> TissueCanvas:
    """Renderer of the 2 x 2 mirrored mosaic, which fills its whole slide."""
    return TissueCanvas(mosaic_size(), (TissueBlock(0, 0, "mosaic"),))


def _write_mosaic(path: Path, fmt: str, mpp: float | None, with_associated: bool) -> Path:
    canvas = mosaic_canvas()
    associated = None
    if with_associated:
        overview = slide_overview(canvas, canvas.size, 16)
        associated = {"label": synthetic_label(), "macro": macro_image(overview)}
    return write_pyramid(path, canvas, canvas.size, mpp=mpp, fmt=fmt,  # type: ignore[arg-type]
                         downsamples=MOSAIC_DOWNSAMPLES, tile_size=TILE_SIZE, quality=QUALITY,
                         associated=associated)


def build_generic_tiff(folder: Path) -> Path:
    """The mosaic as a generic tiled TIFF pyramid with resolution tags (0.499 µm/px)."""
    return _write_mosaic(Path(folder) / "mosaic.tiff", "tiff", REAL_MPP, False)


def build_ome_tiff(folder: Path) -> Path:
    """The mosaic as an OME-TIFF, reduced levels in SubIFDs, PhysicalSizeX/Y 0.499 µm."""
    return _write_mosaic(Path(folder) / "mosaic.ome.tiff", "ome", REAL_MPP, False)


def build_small_svs(folder: Path) -> Path:
    """The mosaic as an Aperio SVS with label and macro (source of the DICOM conversion)."""
    return _write_mosaic(Path(folder) / "small.svs", "svs", REAL_MPP, True)


def build_no_mpp_tiff(folder: Path) -> Path:
    """The real tissue as a generic tiled TIFF with no physical resolution.

    tifffile always writes the baseline XResolution = YResolution = 1 with ResolutionUnit NONE
    (no unit, hence no physical size); OpenSlide and tiffslide derive no mpp from it.
    """
    tissue = real_tissue()
    canvas = TissueCanvas((tissue.shape[1], tissue.shape[0]), (TissueBlock(0, 0, "identity"),))
    return write_pyramid(Path(folder) / "no-mpp.tiff", canvas, canvas.size, mpp=None,
                         fmt="tiff", downsamples=MOSAIC_DOWNSAMPLES, tile_size=TILE_SIZE,
                         quality=QUALITY)


def glass_background(x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
    """Empty glass: light grey 235-250, gentle illumination gradient, faint noise and tint.

    A :data:`wsi.writer.RegionRenderer`; the noise is seeded by the region so it is
    deterministic.
    """
    xs = (x + np.arange(width)) * downsample
    ys = (y + np.arange(height)) * downsample
    shade = 243 + 3 * np.sin(ys / 1500.0)[:, None] * np.cos(xs / 1900.0)[None, :]
    seed = int.from_bytes(hashlib.sha256(f"{x},{y},{width},{height},{downsample}".encode())
                          .digest()[:8], "little")
    noise = np.random.default_rng(seed).normal(0.0, 1.5, (height, width, 3))
    tint = np.array([0.0, -1.0, 1.0])
    return np.clip(shade[..., None] + tint + noise, 235, 250).round().astype(np.uint8)


def build_blank_svs(folder: Path) -> Path:
    """An Aperio SVS the size of the mosaic, 0.499 µm/px, showing only empty glass."""
    return write_pyramid(Path(folder) / "blank.svs", glass_background, mosaic_size(),
                         mpp=REAL_MPP, fmt="svs", downsamples=MOSAIC_DOWNSAMPLES,
                         tile_size=TILE_SIZE, quality=QUALITY)


def _counter_uid_generator(namespace: str) -> Callable[[], str]:
    """Deterministic DICOM UIDs: the n-th call hashes ``namespace`` and n."""
    from pydicom.uid import generate_uid

    counter = itertools.count()
    return lambda: generate_uid(entropy_srcs=[namespace, str(next(counter))])


def dicom_instance(folder: Path) -> Path:
    """The first ``.dcm`` of a DICOM-WSI folder by name; OpenSlide opens the series through it."""
    instances = sorted(Path(folder).glob("*.dcm"))
    if not instances:
        raise FileNotFoundError(f"no .dcm files in {folder}")
    return instances[0]


def build_dicom_wsi(folder: Path, source_svs: Path) -> Path:
    """Convert ``source_svs`` with wsidicomizer into a folder of DICOM-WSI instances.

    JPEG tiles are copied without re-encoding (the thumbnail, label and macro become
    THUMBNAIL, LABEL and OVERVIEW instances of the same series). OpenSlide 4 opens the series
    through any one of its ``.dcm`` files; the returned folder holds nothing else.
    """
    from wsidicomizer import WsiDicomizer

    output = Path(folder) / "dicom"
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    WsiDicomizer.convert(source_svs, output, workers=1,
                         uid_generator=_counter_uid_generator(f"slidepipe-tests:{source_svs.name}"))
    return output


def build_truncated_svs(folder: Path) -> Path:
    """The real SVS cut to 60 % of its bytes.

    Aperio writes each IFD after its page's data, so this cut loses the first IFD itself
    (at ~66 %): neither OpenSlide nor tiffslide can open the file.
    """
    data = REAL_SVS.read_bytes()
    path = Path(folder) / "truncated.svs"
    path.write_bytes(data[: int(len(data) * TRUNCATED_FRACTION)])
    return path


def build_tile_truncated_svs(folder: Path, source_svs: Path) -> Path:
    """``source_svs`` (written by tifffile, IFD before data) cut to 60 % of its bytes.

    The first IFD survives but later tiles and IFDs do not: OpenSlide refuses it at open,
    tiffslide opens it (level 0 only) and fails when reading the missing tiles.
    """
    data = Path(source_svs).read_bytes()
    path = Path(folder) / "tile-truncated.svs"
    path.write_bytes(data[: int(len(data) * TRUNCATED_FRACTION)])
    return path


#: Level-0 tile columns and rows of the small SVS whose JPEG bytes
#: :func:`build_corrupt_tile_svs` zeroes (inside tissue).
CORRUPT_TILE_COLUMNS: Final = range(6, 12)
CORRUPT_TILE_ROWS: Final = range(8, 12)


def corrupt_tile_box() -> Box:
    """Level-0 box covered by the zeroed tiles of :func:`build_corrupt_tile_svs`."""
    x, y = CORRUPT_TILE_COLUMNS.start * TILE_SIZE, CORRUPT_TILE_ROWS.start * TILE_SIZE
    return x, y, len(CORRUPT_TILE_COLUMNS) * TILE_SIZE, len(CORRUPT_TILE_ROWS) * TILE_SIZE


def build_corrupt_tile_svs(folder: Path, source_svs: Path) -> Path:
    """A copy of the small SVS (``source_svs``) whose tiles in :func:`corrupt_tile_box` are zeroed.

    Headers and every other tile are intact: OpenSlide opens it, then fails on reading those
    tiles (and every read after that on the same handle).
    """
    import tifffile

    path = Path(folder) / "corrupt-tile.svs"
    shutil.copyfile(source_svs, path)
    with tifffile.TiffFile(source_svs) as tiff:
        page = tiff.pages.first
        offsets, counts = page.dataoffsets, page.databytecounts
        columns = math.ceil(page.imagewidth / page.tilewidth)
    with open(path, "r+b") as handle:
        for row, column in itertools.product(CORRUPT_TILE_ROWS, CORRUPT_TILE_COLUMNS):
            index = row * columns + column
            handle.seek(offsets[index])
            handle.write(bytes(counts[index]))
    return path


def build_png_named_svs(folder: Path) -> Path:
    """A real PNG (downscaled real tissue) with an ``.svs`` name."""
    path = Path(folder) / "png-named.svs"
    tissue = Image.fromarray(real_tissue())
    tissue.reduce(4).save(path, format="PNG")
    return path


def build_zero_byte(folder: Path) -> Path:
    """An empty file named ``empty.svs``."""
    path = Path(folder) / "empty.svs"
    path.write_bytes(b"")
    return path


def build_unreadable(folder: Path, source_svs: Path | None = None) -> Path:
    """A valid copy of ``source_svs`` (default: a fresh :func:`build_small_svs`) with mode 000.

    Root ignores permission bits, so under root (as in CI containers) the file stays readable;
    tests that need the failure must check ``os.access(path, os.R_OK)`` first.
    """
    path = Path(folder) / "unreadable.svs"
    if source_svs is None:
        source_svs = build_small_svs(Path(folder))
    shutil.copyfile(source_svs, path)
    os.chmod(path, 0)
    return path


# --- A cohort of real-tissue slides with known lesions (MIL end-to-end tests) -----------------

LESION_BLOCK: Final = 256
LESION_GRID: Final = 8  # slides of 8 x 8 blocks
LESION_SIDE: Final = 3  # a lesion covers 3 x 3 blocks


@cache
def _real_blocks(purple: bool, count: int = 6) -> tuple[np.ndarray, ...]:
    """The ``count`` most purple (epithelium, dense nuclei) or most pink (stroma) 256 px blocks
    of the real tissue that are at least 85 % tissue."""
    pixels = real_tissue()
    candidates = []
    for y in range(0, pixels.shape[0] - LESION_BLOCK + 1, 128):
        for x in range(0, pixels.shape[1] - LESION_BLOCK + 1, 128):
            block = pixels[y:y + LESION_BLOCK, x:x + LESION_BLOCK].astype(np.float32)
            high = block.max(axis=2)
            saturation = (high - block.min(axis=2)) / np.maximum(high, 1)
            if (saturation > 0.15).mean() >= 0.85:
                candidates.append((float((block[..., 2] - block[..., 0]).mean()), x, y))
    candidates.sort(reverse=purple)
    return tuple(np.ascontiguousarray(pixels[y:y + LESION_BLOCK, x:x + LESION_BLOCK])
                 for _, x, y in candidates[:count])


def build_lesion_cohort(folder: Path, n_slides: int = 12, seed: int = 0
                        ) -> tuple[Path, dict[str, tuple[int, int, int, int]]]:
    """Slides of real stroma (8 x 8 blocks of 256 px, 0.499 µm/px), half of them with a
    3 x 3-block lesion of real epithelium at a random place. Returns the labels CSV
    (slide_id, patient_id, label, path) and each positive slide's lesion box (x, y, w, h)."""
    rng = np.random.default_rng(seed)
    stroma, lesion = _real_blocks(purple=False, count=3), _real_blocks(purple=True)
    rows, boxes = ["slide_id,patient_id,label,path"], {}
    for index in range(n_slides):
        slide_id, positive = f"case{index:02d}", index % 2 == 1
        cells = [[np.rot90(stroma[rng.integers(len(stroma))], k=int(rng.integers(4)))
                  for _ in range(LESION_GRID)] for _ in range(LESION_GRID)]
        if positive:
            row0, col0 = (int(v) for v in rng.integers(0, LESION_GRID - LESION_SIDE + 1, 2))
            for r in range(row0, row0 + LESION_SIDE):
                for c in range(col0, col0 + LESION_SIDE):
                    cells[r][c] = np.rot90(lesion[rng.integers(len(lesion))],
                                           k=int(rng.integers(4)))
            side = LESION_SIDE * LESION_BLOCK
            boxes[slide_id] = (col0 * LESION_BLOCK, row0 * LESION_BLOCK, side, side)
        canvas = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
        size = LESION_GRID * LESION_BLOCK
        levels: dict[float, np.ndarray] = {1.0: canvas}

        def render(x: int, y: int, w: int, h: int, ds: float,
                   levels: dict[float, np.ndarray] = levels) -> np.ndarray:
            if ds not in levels:
                levels[ds] = np.asarray(Image.fromarray(levels[1.0]).reduce(int(ds)))
            region = np.full((h, w, 3), 255, dtype=np.uint8)
            part = levels[ds][y:y + h, x:x + w]
            region[:part.shape[0], :part.shape[1]] = part
            return region

        path = write_pyramid(Path(folder) / f"{slide_id}.svs", render, (size, size),
                             mpp=REAL_MPP, downsamples=(1, 4))
        rows.append(f"{slide_id},patient{index:02d},{'positive' if positive else 'negative'},"
                    f"{path.name}")
    labels = Path(folder) / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels, boxes
