"""Tissue mask + patch grid: slidepipe against CLAM's per-patch contour test.

Run ``.venv/bin/python benchmarks/tiling.py`` (``--quick`` for a smoke run).

On the 40960 x 40960 Aperio SVS of ``tests.builders.build_large_svs`` (real H&E tissue, cached
in ``benchmarks/_data/``) it times slidepipe's three steps separately: (1) reading the
low-resolution thumbnail, (2) the tissue mask (``segment_tissue`` on the thumbnail; the
marker-ink mask that ``detect_tissue`` also computes, and ``build_grid`` uses, is shown on its
own line) and (3) the grid (``build_grid``). The baseline is a re-implementation of the way
CLAM lays its grid, fed the *same* tissue mask:

- contours of the mask with OpenCV (``cv2.findContours``, ``RETR_CCOMP``, ``CHAIN_APPROX_NONE``),
  split into tissue contours and their holes, scaled to level-0 pixels;
- for every candidate patch position of the same global grid (step = patch size) inside each
  tissue contour's bounding box, CLAM's ``four_pt`` test in a Python loop: the patch is kept
  when any of the four points (centre ± patch/4 in x and y) lies in the contour
  (``cv2.pointPolygonTest(...) >= 0``) and its centre lies in none of the contour's holes
  (``> 0``; CLAM tests the hole condition on the patch centre).

The thumbnail read is excluded from both sides (it is the same read for both). The ratio that
carries the target compares like with like: the baseline's contours + loop against slidepipe's
``build_grid``, both starting from the same mask. A second ratio adds the shared mask step to
both sides (end to end from the thumbnail). A row marked *info* runs the same test the way
CLAM's ``process_contour`` actually runs it: a new ``multiprocessing.Pool`` of min(cores, 4)
workers per contour and one ``starmap`` task per candidate (each task pickles the contour and
its holes); its cost is mostly pool start-up, so it grows with the number of contours.

Two further sections are for information. A *dense* scenario lays the real tissue mask side
by side over the whole slide, so that the baseline's per-patch loop has a resection's worth of
candidates. The CMU-1-Small-Region demonstration runs CLAM's default segmentation preset
(saturation median blur 7, threshold 8, closing 4, ``a_t=100`` counted in 512 x 512 level-0
patches) on the real 2220 x 2967 biopsy: the minimum tissue area is 26.2 Mpx, four times the
whole slide, so CLAM finds no tissue and writes no patches; slidepipe's physical-unit default is
shown beside it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from dataclasses import dataclass

import cv2
import numpy as np
from _common import best_of, large_svs, machine, ms, print_table, real_svs, verdict

import wsi
from wsi.tiling import GridSpec, TileGrid
from wsi.tissue import TissueMask, TissueSettings, pen_mark_mask, segment_tissue

#: Targets of this benchmark.
TARGET_RATIO = 20.0
TARGET_SECONDS = 1.0

#: CLAM's default segmentation preset (``create_patches_fp.py``): saturation threshold, median
#: window, closing kernel, minimum tissue area and hole area in reference patches, hole count.
CLAM_STHRESH = 8
CLAM_MTHRESH = 7
CLAM_CLOSE = 4
CLAM_A_T = 100
CLAM_A_H = 16
CLAM_MAX_N_HOLES = 8
CLAM_REF_PATCH = 512
CLAM_SEG_DOWNSAMPLE = 64


# -- CLAM-style baseline (re-implemented from the description of its algorithm) ---------------
@dataclass
class Contours:
    """Tissue contours and, per contour, its holes, in level-0 pixels (int32, OpenCV layout)."""

    tissue: list[np.ndarray]
    holes: list[list[np.ndarray]]


def clam_contours(mask: np.ndarray, downsample: tuple[float, float]) -> Contours:
    """Contours of a boolean mask with their holes (``RETR_CCOMP``), scaled to level 0."""
    found, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                        cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return Contours([], [])
    parents = hierarchy[0][:, 3]
    scale = np.asarray(downsample, dtype=np.float64)
    outer = np.flatnonzero(parents == -1)
    tissue = [(found[i] * scale).astype(np.int32) for i in outer]
    holes = [[(found[j] * scale).astype(np.int32) for j in np.flatnonzero(parents == i)]
             for i in outer]
    return Contours(tissue, holes)


def clam_four_pt_grid(contours: Contours, patch: int, step: int) -> np.ndarray:
    """CLAM's per-patch test over every grid position in each contour's bounding box.

    Positions are on the global grid (multiples of ``step``), so they are the same candidates
    slidepipe scores. Returns the kept level-0 top-left corners (N, 2), duplicates removed.
    """
    shift = patch // 4
    half = patch // 2
    kept: list[tuple[int, int]] = []
    for contour, holes in zip(contours.tissue, contours.holes, strict=True):
        x, y, w, h = cv2.boundingRect(contour)
        for py in range(y // step * step, y + h, step):
            for px in range(x // step * step, x + w, step):
                cx, cy = px + half, py + half
                inside = False
                for qx, qy in ((cx - shift, cy - shift), (cx + shift, cy + shift),
                               (cx + shift, cy - shift), (cx - shift, cy + shift)):
                    if cv2.pointPolygonTest(contour, (float(qx), float(qy)), False) >= 0:
                        inside = True
                        break
                if inside and any(cv2.pointPolygonTest(hole, (float(cx), float(cy)), False) > 0
                                  for hole in holes):
                    inside = False
                if inside:
                    kept.append((px, py))
    if not kept:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.asarray(kept, dtype=np.int64), axis=0)


def _four_pt_candidate(coord: tuple[int, int], holes: list[np.ndarray], patch: int,
                       contour: np.ndarray) -> tuple[int, int] | None:
    """One candidate of :func:`clam_four_pt_grid`, as a pool worker task (CLAM ships each
    candidate to a worker with its contour and the contour's holes)."""
    shift, half = patch // 4, patch // 2
    cx, cy = coord[0] + half, coord[1] + half
    for qx, qy in ((cx - shift, cy - shift), (cx + shift, cy + shift),
                   (cx + shift, cy - shift), (cx - shift, cy + shift)):
        if cv2.pointPolygonTest(contour, (float(qx), float(qy)), False) >= 0:
            if any(cv2.pointPolygonTest(hole, (float(cx), float(cy)), False) > 0
                   for hole in holes):
                return None
            return coord
    return None


def clam_four_pt_grid_pooled(contours: Contours, patch: int, step: int) -> np.ndarray:
    """:func:`clam_four_pt_grid` run the way CLAM's ``process_contour`` runs it: a new process
    pool of min(cores, 4) workers per contour, one ``starmap`` task per candidate position."""
    workers = min(os.cpu_count() or 1, 4)
    kept: list[tuple[int, int]] = []
    for contour, holes in zip(contours.tissue, contours.holes, strict=True):
        x, y, w, h = cv2.boundingRect(contour)
        tasks = [((px, py), holes, patch, contour)
                 for py in range(y // step * step, y + h, step)
                 for px in range(x // step * step, x + w, step)]
        with multiprocessing.Pool(workers) as pool:
            kept.extend(c for c in pool.starmap(_four_pt_candidate, tasks) if c is not None)
    if not kept:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.asarray(kept, dtype=np.int64), axis=0)


def candidate_count(contours: Contours, step: int) -> int:
    """How many patch positions :func:`clam_four_pt_grid` tests."""
    total = 0
    for contour in contours.tissue:
        x, y, w, h = cv2.boundingRect(contour)
        total += len(range(x // step * step, x + w, step)) * len(range(y // step * step, y + h,
                                                                         step))
    return total


@dataclass
class ClamSegmentation:
    """What CLAM's segmentation keeps: contours (level 0), tissue area and the threshold used."""

    contours: Contours
    found: int
    area_px: float
    min_area_px: float


def clam_segment(rgb: np.ndarray, downsample: float, a_t: float = CLAM_A_T) -> ClamSegmentation:
    """CLAM's ``segmentTissue`` with its default preset on an RGB image at ``downsample``.

    Median-blurred HSV saturation above a fixed threshold, closing, contours; a tissue contour is
    kept when its area minus its holes' exceeds ``a_t`` reference patches of 512 x 512 level-0
    pixels (scaled to the segmentation level), with at most 8 holes larger than ``a_h``.
    """
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    blurred = cv2.medianBlur(saturation, CLAM_MTHRESH)
    _, binary = cv2.threshold(blurred, CLAM_STHRESH, 255, cv2.THRESH_BINARY)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((CLAM_CLOSE, CLAM_CLOSE), np.uint8))
    ref_area = CLAM_REF_PATCH ** 2 / downsample ** 2
    min_area, min_hole = a_t * ref_area, CLAM_A_H * ref_area
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return ClamSegmentation(Contours([], []), 0, 0.0, min_area * downsample ** 2)
    parents = hierarchy[0][:, 3]
    tissue: list[np.ndarray] = []
    holes: list[list[np.ndarray]] = []
    area = 0.0
    outer = np.flatnonzero(parents == -1)
    for index in outer:
        children = [found[j] for j in np.flatnonzero(parents == index)]
        net = cv2.contourArea(found[index]) - sum(cv2.contourArea(c) for c in children)
        if net == 0 or net <= min_area:
            continue
        big = sorted((c for c in children if cv2.contourArea(c) > min_hole),
                     key=cv2.contourArea, reverse=True)[:CLAM_MAX_N_HOLES]
        tissue.append((found[index] * downsample).astype(np.int32))
        holes.append([(c * downsample).astype(np.int32) for c in big])
        area += net - sum(cv2.contourArea(c) for c in big)
    return ClamSegmentation(Contours(tissue, holes), len(outer), area * downsample ** 2,
                            min_area * downsample ** 2)


# -- slidepipe steps --------------------------------------------------------------------------
def tissue_from(mask: np.ndarray, pen: np.ndarray, thumbnail: np.ndarray, slide: wsi.Slide,
                mask_mpp: float, threshold: float) -> TissueMask:
    """A :class:`TissueMask` from parts, exactly as ``detect_tissue`` assembles it."""
    return TissueMask(mask=mask, level0_size=slide.dimensions, mask_mpp=mask_mpp,
                      threshold=threshold, thumbnail=thumbnail, pen=pen)


def coord_overlap(a: np.ndarray, b: np.ndarray) -> int:
    """Number of level-0 positions present in both coordinate arrays."""
    return len({tuple(p) for p in a.tolist()} & {tuple(p) for p in b.tolist()})


def ratio(baseline: float, ours: float) -> str:
    """``baseline / ours`` formatted as a speed-up."""
    return f"{baseline / ours:.2f}x" if ours > 0 else "inf"


def large_slide_section(repeats: int) -> tuple[float, float]:
    """Time the three slidepipe steps and the baseline on the large SVS; print the table.

    Returns (grid-step ratio baseline/slidepipe, slidepipe mask+grid seconds).
    """
    path = large_svs()
    slide = wsi.open_slide(path)
    tissue_settings, grid_settings = TissueSettings(), wsi.GridSettings()
    spec = wsi.plan_grid(slide, grid_settings)
    mask_mpp = max(tissue_settings.mask_mpp, slide.level0_mpp)

    t_thumb, thumbnail = best_of(lambda: slide.thumbnail(target_mpp=mask_mpp), repeats)
    mask_mpp = slide.level0_mpp * slide.dimensions[0] / thumbnail.shape[1]
    t_mask, (mask, threshold) = best_of(
        lambda: segment_tissue(thumbnail, mask_mpp, tissue_settings), repeats)
    t_pen, pen = best_of(lambda: pen_mark_mask(thumbnail), repeats)
    tissue = tissue_from(mask, pen, thumbnail, slide, mask_mpp, threshold)
    t_grid, grid = best_of(lambda: wsi.build_grid(tissue, spec, grid_settings), repeats)

    t_contours, contours = best_of(lambda: clam_contours(tissue.mask, tissue.downsample),
                                   repeats)
    t_loop, coords = best_of(lambda: clam_four_pt_grid(contours, spec.patch_size_level0,
                                                      spec.step_level0), repeats)
    t_pooled, pooled = best_of(lambda: clam_four_pt_grid_pooled(
        contours, spec.patch_size_level0, spec.step_level0), repeats)
    assert np.array_equal(pooled, coords)
    candidates = candidate_count(contours, spec.step_level0)
    t_baseline = t_contours + t_loop
    t_ours = t_mask + t_grid
    t_full = t_mask + t_pen + t_grid
    width, height = slide.dimensions
    print(f"\n== Large SVS {width} x {height}, {slide.level0_mpp} µm/px, "
          f"mask {thumbnail.shape[1]} x {thumbnail.shape[0]} at {mask_mpp:.2f} µm/px, grid "
          f"{spec.patch_size} px at {spec.target_mpp} µm/px (step {spec.step_level0} level-0 px)"
          f"; tissue {tissue.area_mm2:.2f} mm², {len(contours.tissue)} tissue contours; "
          f"best of {repeats}")
    rows = [
        ["(1) thumbnail read (excluded from both)", ms(t_thumb), "", ""],
        ["(2) mask: segment_tissue", ms(t_mask), "(same mask)", ""],
        ["(2b) marker-ink mask (detect_tissue; used by grid)", ms(t_pen), "-", ""],
        ["(3) grid: build_grid  vs  contours + four_pt loop", ms(t_grid), ms(t_baseline),
         ratio(t_baseline, t_grid)],
        ["      baseline: cv2.findContours + scale", "", ms(t_contours), ""],
        [f"      baseline: four_pt loop ({candidates} candidates)", "", ms(t_loop), ""],
        ["(3') info: contours + loop in a pool per contour (as CLAM ships it)", ms(t_grid),
         ms(t_contours + t_pooled), ratio(t_contours + t_pooled, t_grid)],
        ["mask + grid  (2)+(3)", ms(t_ours), ms(t_mask + t_baseline),
         ratio(t_mask + t_baseline, t_ours)],
        ["mask + ink + grid  (2)+(2b)+(3)", ms(t_full), "", ""],
        ["patches", len(grid), len(coords), f"{coord_overlap(grid.coords, coords)} common"],
    ]
    print_table(["step", "slidepipe", "CLAM-style", "baseline/slidepipe"], rows)
    return t_baseline / t_grid, t_ours


def dense_section(repeats: int, pooled: bool) -> None:
    """For information: the real tissue mask tiled over the whole large-slide area. With
    ``pooled``, also CLAM's process pool per contour, once (about ten seconds)."""
    biopsy = wsi.open_slide(real_svs())
    tissue = wsi.detect_tissue(biopsy)
    large = wsi.open_slide(large_svs())
    spec: GridSpec = wsi.plan_grid(large, wsi.GridSettings())
    shape = (round(large.dimensions[1] / tissue.downsample[1]),
             round(large.dimensions[0] / tissue.downsample[0]))
    reps = (-(-shape[0] // tissue.mask.shape[0]), -(-shape[1] // tissue.mask.shape[1]))
    mask = np.tile(tissue.mask, reps)[:shape[0], :shape[1]]
    dense = TissueMask(mask=mask, level0_size=large.dimensions, mask_mpp=tissue.mask_mpp,
                       threshold=tissue.threshold, thumbnail=np.zeros((1, 1, 3), np.uint8),
                       pen=np.zeros_like(mask))
    settings = wsi.GridSettings()
    t_grid, grid = best_of(lambda: wsi.build_grid(dense, spec, settings), repeats)
    t_contours, contours = best_of(lambda: clam_contours(dense.mask, dense.downsample), repeats)
    t_loop, coords = best_of(lambda: clam_four_pt_grid(contours, spec.patch_size_level0,
                                                      spec.step_level0), repeats)
    t_baseline = t_contours + t_loop
    print(f"\n== For information: dense tissue (the real biopsy's mask tiled {reps[1]} x "
          f"{reps[0]} over the {large.dimensions[0]} x {large.dimensions[1]} slide, "
          f"{dense.area_mm2:.0f} mm², {len(contours.tissue)} tissue contours); best of {repeats}")
    rows = [
        ["grid: build_grid  vs  contours + four_pt loop", ms(t_grid), ms(t_baseline),
         ratio(t_baseline, t_grid)],
        ["      baseline: cv2.findContours + scale", "", ms(t_contours), ""],
        [f"      baseline: four_pt loop ({candidate_count(contours, spec.step_level0)} "
         "candidates)", "", ms(t_loop), ""],
        ["patches", len(grid), len(coords), f"{coord_overlap(grid.coords, coords)} common"],
    ]
    if pooled:
        t_pooled, _ = best_of(lambda: clam_four_pt_grid_pooled(
            contours, spec.patch_size_level0, spec.step_level0), 1)
        rows.insert(3, ["contours + loop in a pool per contour (as CLAM ships it; 1 run)",
                        ms(t_grid), ms(t_contours + t_pooled),
                        ratio(t_contours + t_pooled, t_grid)])
    print_table(["step", "slidepipe", "CLAM-style", "baseline/slidepipe"], rows)


def biopsy_section() -> None:
    """CLAM's default preset against slidepipe's default on the real small biopsy."""
    path = real_svs()
    slide = wsi.open_slide(path)
    tissue = wsi.detect_tissue(slide)
    settings = wsi.GridSettings()
    spec = wsi.plan_grid(slide, settings)
    grid: TileGrid = wsi.build_grid(tissue, spec, settings)

    # CLAM segments at the level closest to a 64x downsample: the only level of this slide.
    level = slide.best_level(CLAM_SEG_DOWNSAMPLE)
    downsample = slide.level_downsamples[level]
    rgb = slide.read_region((0, 0), level, slide.level_dimensions[level])
    px_mm2 = (slide.level0_mpp * 1e-3) ** 2
    width, height = slide.dimensions
    rows = [["slidepipe default (min_area 0.005 mm²)", "-", f"{tissue.area_mm2:.2f}", len(grid)]]
    for a_t, label in ((CLAM_A_T, "CLAM default preset (a_t=100)"),
                       (1, "CLAM preset with a_t=1 (for comparison)")):
        seg = clam_segment(rgb, downsample, a_t)
        coords = clam_four_pt_grid(seg.contours, spec.patch_size_level0, spec.step_level0)
        rows.append([label, f"{seg.min_area_px / 1e6:.2f} Mpx",
                     f"{seg.area_px * px_mm2:.2f}", len(coords)])
    print(f"\n== Demonstration: {path.name} ({width} x {height} = {width * height / 1e6:.2f} "
          f"Mpx, {slide.level0_mpp} µm/px, one level), 256 px patches at 0.5 µm/px")
    print_table(["segmentation", "min tissue area", "tissue mm²", "patches"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per timing (best of)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    cv2.setNumThreads(1)
    print(f"slidepipe tiling benchmark — {machine()}, OpenCV {cv2.__version__}, single thread")
    grid_ratio, seconds = large_slide_section(repeats)
    dense_section(max(1, min(repeats, 3)), pooled=not args.quick)
    biopsy_section()
    print()
    verdict(f"grid ratio >= {TARGET_RATIO:g}x", grid_ratio >= TARGET_RATIO,
            f"CLAM-style contours + loop / build_grid = {grid_ratio:.2f}x")
    verdict(f"slidepipe mask+grid < {TARGET_SECONDS:g} s", seconds < TARGET_SECONDS,
            f"segment_tissue + build_grid = {seconds:.3f} s per slide")
    return 0


if __name__ == "__main__":
    sys.exit(main())
