"""Patch reading throughput: slidepipe's PatchReader against OpenSlide and the decode ceiling.

Run ``.venv/bin/python benchmarks/read.py`` (``--quick`` for a smoke run).

Single-threaded (numeric libraries pinned to one thread, no threads of our own), patches/s for
the tissue patches of a grid, three ways:

(a) slidepipe: a fresh :class:`wsi.PatchReader` (cold tile cache) and ``read_batch`` over the
    coordinates in batches of 64;
(b) the CLAM way: ``openslide.OpenSlide(path).read_region((x, y), level, (s, s))
    .convert("RGB")`` per patch (plus the same bilinear resize when the grid needs one);
(c) the decode-only ceiling: the compressed bytes of every stored JPEG tile that covers the
    patches (tifffile ``dataoffsets``/``databytecounts``, ``os.pread``), each decoded once with
    ``imagecodecs.jpeg8_decode(data, tables=page.jpegtables, ...)``, as patches/s = patches /
    time to decode their covering tiles. The colour-space arguments are the ones tifffile uses
    for the page (Aperio stores untransformed RGB in its JPEG tiles; without them libjpeg would
    apply a YCbCr transform, which is both wrong and slower, flattering the ratio).

Each timing is the best of several passes over all the coordinates; the three methods are
interleaved pass by pass so they see the same machine noise, and (a) is checked bit-identical
to (b) on every pass's first batch (patches wholly inside the slide). The targets apply to the
main scenario: the first 3000 tissue patches (row-major, as a pipeline reads them) of the
default grid, 0.5 µm/px and 256 px, on the 256 px stored tiles of the 40960 x 40960
resection-like SVS of ``tests.builders.build_resection_svs`` (real tissue over about 40 % of
the slide, about 11 900 tissue patches, JPEG quality 70 as Aperio scanners write): a ≥ 0.8 c
and a ≥ 3 b. The other scenarios are shown for information: on the resection slide, the grid
offset by half a tile (each patch spans four tiles) and 1.0 µm/px (513 px read from level 0
and resized), fewer patches each; all 410 tissue patches of the sparse SVS of
``tests.builders.build_large_svs`` (eight small biopsies, JPEG quality 90); and the real
CMU-1-Small-Region scan (240 px tiles, 54 patches).
"""

from __future__ import annotations

import os

from _common import force_single_thread

force_single_thread()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import openslide  # noqa: E402
import tifffile  # noqa: E402
from _common import (  # noqa: E402
    large_svs,
    machine,
    print_table,
    real_svs,
    resection_svs,
    verdict,
)
from PIL import Image  # noqa: E402

import wsi  # noqa: E402

#: Targets for the tile-aligned scenario.
TARGET_VS_CEILING = 0.8
TARGET_VS_OPENSLIDE = 3.0

#: Patches per ``read_batch`` call (the pipeline's QC batch size).
BATCH = 64


@dataclass
class Scenario:
    """A slide, a grid and the level-0 coordinates to read."""

    name: str
    path: Path
    slide: wsi.Slide
    spec: wsi.GridSpec
    coords: np.ndarray
    has_targets: bool


@dataclass
class Result:
    """Best seconds per method for one scenario, and how many tiles the ceiling decodes."""

    scenario: Scenario
    slidepipe: float
    openslide: float
    ceiling: float
    tiles: int

    def rate(self, seconds: float) -> float:
        """Patches per second for a pass that took ``seconds``."""
        return len(self.scenario.coords) / seconds


def make_scenario(name: str, path: Path, target_mpp: float, limit: int, *,
                  offset: int = 0, has_targets: bool = False) -> Scenario:
    """The first ``limit`` tissue patches of the default grid at ``target_mpp`` (256 px),
    shifted by ``offset`` level-0 pixels in x and y. ``{read}`` and ``{level}`` in ``name`` are
    replaced by the grid's read size and pyramid level."""
    slide = wsi.open_slide(path)
    settings = wsi.GridSettings(target_mpp=target_mpp, patch_size=256)
    spec = wsi.plan_grid(slide, settings)
    grid = wsi.build_grid(wsi.detect_tissue(slide), spec, settings)
    coords = grid.coords[:limit] + offset
    name = name.format(read=spec.read_size, level=spec.level)
    return Scenario(name, path, slide, spec, coords, has_targets)


# -- the three readers -----------------------------------------------------------------------
def read_slidepipe(scenario: Scenario) -> np.ndarray:
    """(a) A fresh PatchReader over all coordinates; returns the first batch."""
    first: np.ndarray | None = None
    with wsi.PatchReader(scenario.slide, scenario.spec) as reader:
        assert reader.uses_tile_decoder
        for start in range(0, len(scenario.coords), BATCH):
            batch = reader.read_batch(scenario.coords[start:start + BATCH])
            if first is None:
                first = batch
    assert first is not None
    return first


def read_openslide(scenario: Scenario) -> np.ndarray:
    """(b) OpenSlide ``read_region`` + ``convert("RGB")`` per patch; returns the first batch."""
    spec = scenario.spec
    size, read = spec.patch_size, spec.read_size
    first: list[np.ndarray] = []
    with openslide.OpenSlide(str(scenario.path)) as slide:
        for index, (x, y) in enumerate(scenario.coords.tolist()):
            image = slide.read_region((x, y), spec.level, (read, read)).convert("RGB")
            if spec.needs_resize:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            if index < BATCH:
                first.append(np.asarray(image))
    return np.stack(first)


@dataclass
class TileJob:
    """The stored tiles covering a scenario's patches: file, offsets, byte counts, decoder."""

    path: Path
    offsets: list[int]
    counts: list[int]
    tables: bytes | None
    colorspace: int | None
    outcolorspace: int | str | None


def covering_tiles(scenario: Scenario) -> TileJob:
    """Every stored tile that at least one patch overlaps, each once, in file order."""
    spec = scenario.spec
    width, height = scenario.slide.level_dimensions[spec.level]
    with tifffile.TiffFile(scenario.path) as tif:
        page = next(p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled
                    and (p.imagewidth, p.imagelength) == (width, height))
        if page.compression != 7 or page.samplesperpixel != 3:
            raise SystemExit(f"{scenario.path}: level {spec.level} is not RGB JPEG tiles")
        # tifffile's own rule for the decoder's colour spaces (not slidepipe's copy of it)
        colorspaces = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        tw, th = page.tilewidth, page.tilelength
        across = -(-width // tw)
        indices: set[int] = set()
        for x0, y0 in scenario.coords.tolist():
            x, y = int(x0 // spec.level_downsample), int(y0 // spec.level_downsample)
            x_end, y_end = min(x + spec.read_size, width), min(y + spec.read_size, height)
            for tile_y in range(max(y, 0) // th, (y_end - 1) // th + 1):
                for tile_x in range(max(x, 0) // tw, (x_end - 1) // tw + 1):
                    indices.add(tile_y * across + tile_x)
        order = sorted(indices)
        return TileJob(scenario.path, [page.dataoffsets[i] for i in order],
                       [page.databytecounts[i] for i in order], page.jpegtables, *colorspaces)


def decode_tiles(job: TileJob) -> None:
    """(c) pread + decode every covering tile once."""
    fd = os.open(job.path, os.O_RDONLY)
    try:
        for offset, count in zip(job.offsets, job.counts, strict=True):
            imagecodecs.jpeg8_decode(os.pread(fd, count, offset), tables=job.tables,
                                     colorspace=job.colorspace,
                                     outcolorspace=job.outcolorspace)
    finally:
        os.close(fd)


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def patches_inside(scenario: Scenario) -> np.ndarray:
    """Which patches lie wholly inside the slide. Only those are compared: beyond the edge
    OpenSlide returns transparent black, slidepipe white (as ``Slide.read_region`` does)."""
    spec = scenario.spec
    width, height = scenario.slide.dimensions
    extent = round(spec.read_size * spec.level_downsample)
    coords = scenario.coords
    return ((coords >= 0).all(axis=1) & (coords[:, 0] + extent <= width)
            & (coords[:, 1] + extent <= height))


def measure(scenario: Scenario, passes: int) -> Result:
    """Best-of-``passes`` seconds of (a), (b) and (c), interleaved pass by pass."""
    job = covering_tiles(scenario)
    best = {"a": float("inf"), "b": float("inf"), "c": float("inf")}
    for _ in range(passes):
        seconds, ours = timed(lambda: read_slidepipe(scenario))
        best["a"] = min(best["a"], seconds)
        seconds, theirs = timed(lambda: read_openslide(scenario))
        best["b"] = min(best["b"], seconds)
        inside = patches_inside(scenario)[:len(ours)]
        if not np.array_equal(ours[inside], theirs[inside]):
            raise SystemExit(f"{scenario.name}: PatchReader and OpenSlide pixels differ")
        seconds, _ = timed(lambda: decode_tiles(job))
        best["c"] = min(best["c"], seconds)
    return Result(scenario, best["a"], best["b"], best["c"], len(job.offsets))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few patches, two passes")
    parser.add_argument("--patches", type=int, default=None,
                        help="first N tissue patches of the main scenario (default 3000; "
                             "quick 192)")
    parser.add_argument("--passes", type=int, default=None,
                        help="passes per method, best kept (default 5; quick 2)")
    args = parser.parse_args(argv)
    limit = args.patches or (192 if args.quick else 3000)
    extra = max(1, limit // 3)
    passes = args.passes or (2 if args.quick else 5)
    print(f"slidepipe read benchmark — {machine()}, one thread, imagecodecs "
          f"{imagecodecs.__version__}, OpenSlide {openslide.__library_version__}")
    resection, large, real = resection_svs(), large_svs(), real_svs()
    scenarios = [
        make_scenario("aligned: resection SVS (Q=70), 0.5 µm/px, 256 px on 256 px tiles",
                      resection, 0.5, limit, has_targets=True),
        make_scenario("offset 128 px: each patch spans 4 tiles (resection)", resection, 0.5,
                      extra, offset=128),
        make_scenario("1.0 µm/px: {read} px from level {level}, resized (resection)", resection,
                      1.0, max(1, extra // 3)),
        make_scenario("aligned: sparse SVS (Q=90), its tissue patches", large, 0.5, limit),
        make_scenario("CMU-1-Small-Region: 240 px tiles", real, 0.5, limit),
    ]
    results = [measure(scenario, passes) for scenario in scenarios]
    rows = []
    for result in results:
        a, b, c = (result.rate(s) for s in (result.slidepipe, result.openslide, result.ceiling))
        rows.append([result.scenario.name, len(result.scenario.coords),
                     f"{result.tiles / len(result.scenario.coords):.2f}", f"{a:.0f}", f"{b:.0f}",
                     f"{c:.0f}", f"{a / c:.2f}", f"{a / b:.2f}"])
    print(f"\npatches/s, best of {passes} passes (each pass reads every patch of the scenario; "
          f"a: fresh reader per pass)")
    print_table(["scenario", "patches", "tiles/patch", "(a) slidepipe", "(b) OpenSlide",
                 "(c) decode ceiling", "a/c", "a/b"], rows)
    print()
    for result in results:
        if not result.scenario.has_targets:
            continue
        a, b, c = (result.rate(s) for s in (result.slidepipe, result.openslide, result.ceiling))
        verdict(f"a >= {TARGET_VS_CEILING:g} x c", a >= TARGET_VS_CEILING * c,
                f"a/c = {a / c:.2f} ({a:.0f} vs {c:.0f} patches/s)")
        verdict(f"a >= {TARGET_VS_OPENSLIDE:g} x b", a >= TARGET_VS_OPENSLIDE * b,
                f"a/b = {a / b:.2f} ({a:.0f} vs {b:.0f} patches/s; ceiling c/b = {c / b:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
