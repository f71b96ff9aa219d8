"""Heatmap rendering from stored coordinates and scores (mil.heatmap), on hand-made patches
checked against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from scipy import ndimage
from shapely.geometry import Polygon, box

from mil.heatmap import (
    NO_DATA,
    CodeTiles,
    PatchSet,
    from_uint8,
    iter_windows,
    render,
    render_slide,
    render_uint8,
    threshold_regions,
    to_uint8,
    window_cells,
)
from mil.heatmap_scale import PERCEPTUAL_COLORMAPS, colorize, fit_normaliser, normalise


def _reference(sets: list[tuple[np.ndarray, np.ndarray, int]], size: tuple[int, int],
               supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Dense (sum, count) of patches on a grid of level-0 pixels split supersample x
    supersample, drawn one patch at a time."""
    width, height = size[0] * supersample, size[1] * supersample
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for coords, scores, footprint in sets:
        for (x, y), score in zip(coords * supersample, scores, strict=True):
            f = footprint * supersample
            total[max(y, 0):y + f, max(x, 0):x + f] += score
            count[max(y, 0):y + f, max(x, 0):x + f] += 1
    return total, count


def _block_mean(total: np.ndarray, count: np.ndarray, block: int) -> np.ndarray:
    h, w = total.shape[0] // block, total.shape[1] // block
    t = total[:h * block, :w * block].reshape(h, block, w, block).sum((1, 3))
    c = count[:h * block, :w * block].reshape(h, block, w, block).sum((1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, t / c, np.nan)


@pytest.fixture
def random_patches() -> tuple[np.ndarray, np.ndarray, int]:
    """300 patches of 64 px on a 32 px step grid (overlapping by half) over 1000 x 800."""
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(0, 1000, 32), np.arange(0, 800, 32))
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    coords = coords[rng.choice(len(coords), 300, replace=False)]
    return coords, rng.random(300), 64


def test_overlapping_patches_are_averaged_and_empty_area_is_nan() -> None:
    patches = PatchSet(np.array([[0, 0], [100, 0], [50, 50]]), [1.0, 0.0, 0.4], 100)
    raster = render([patches], 0, 0, 300, 300, 1.0)
    assert raster.dtype == np.float32 and raster.shape == (300, 300)
    assert raster[10, 10] == 1.0                      # first patch alone
    assert raster[10, 150] == 0.0                     # second patch alone
    assert raster[75, 75] == pytest.approx(0.7)       # first and third
    assert raster[75, 125] == pytest.approx(0.2)      # second and third
    assert raster[125, 125] == pytest.approx(0.4)     # third alone
    assert np.isnan(raster[200, 10]) and np.isnan(raster[10, 250])
    assert np.isnan(raster).sum() == 300 * 300 - (200 * 100 + 100 * 100 - 100 * 50)


@pytest.mark.parametrize("downsample", [1.0, 4.0, 2.5])
def test_render_matches_a_brute_force_reference(random_patches: tuple, downsample: float
                                                ) -> None:
    coords, scores, footprint = random_patches
    size = (1000, 800)
    width, height = int(size[0] // downsample), int(size[1] // downsample)
    raster = render([PatchSet(coords, scores, footprint)], 0, 0, width, height, downsample)
    supersample = 2 if downsample % 1 else 1
    total, count = _reference([random_patches], size, supersample)
    expected = _block_mean(total, count, int(downsample * supersample))[:height, :width]
    assert np.array_equal(np.isnan(raster), np.isnan(expected))
    np.testing.assert_allclose(raster, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("sigma_px", [0.0, 3.0])
def test_tile_by_tile_equals_whole(random_patches: tuple, sigma_px: float) -> None:
    patches = [PatchSet(*random_patches)]
    whole = render(patches, 0, 0, 333, 267, 3.0, sigma_px=sigma_px)
    for tile in (64, 100, 1000):
        tiled = render_slide(patches, 333, 267, 3.0, sigma_px=sigma_px, tile=tile)
        assert np.array_equal(np.isnan(whole), np.isnan(tiled))
        np.testing.assert_allclose(tiled, whole, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_windows_cover_the_raster_once() -> None:
    covered = np.zeros((70, 130), dtype=int)
    for x, y, w, h in iter_windows(130, 70, 32):
        covered[y:y + h, x:x + w] += 1
    assert (covered == 1).all()


def test_smoothing_is_nan_aware(random_patches: tuple) -> None:
    coords, _, footprint = random_patches
    constant = [PatchSet(coords, np.full(len(coords), 0.3), footprint)]
    raw = render(constant, 0, 0, 250, 200, 4.0)
    smooth = render(constant, 0, 0, 250, 200, 4.0, sigma_px=5.0)
    assert np.array_equal(np.isnan(raw), np.isnan(smooth))     # no bleeding into empty area
    np.testing.assert_allclose(smooth[np.isfinite(smooth)], 0.3, rtol=1e-5)

    step = [PatchSet(np.array([[0, 0], [100, 0]]), [0.0, 1.0], 100)]
    profile = render(step, 0, 0, 200, 100, 1.0, sigma_px=10.0)[50]
    assert profile[0] == pytest.approx(0.0, abs=1e-6) and profile[-1] == pytest.approx(1.0)
    assert np.all(np.diff(profile) >= -1e-7) and 0.3 < profile[100] < 0.7


def test_several_patch_sets_merge_by_overlap_averaging() -> None:
    coarse = PatchSet(np.array([[0, 0]]), [0.2], 256)
    fine = PatchSet(np.array([[64, 64], [96, 64]]), [1.0, 0.6], 64)
    raster = render([coarse, fine], 0, 0, 256, 256, 1.0)
    assert raster[10, 10] == pytest.approx(0.2)
    assert raster[70, 70] == pytest.approx((0.2 + 1.0) / 2)
    assert raster[70, 100] == pytest.approx((0.2 + 1.0 + 0.6) / 3)
    assert raster[70, 150] == pytest.approx((0.2 + 0.6) / 2)


def test_patch_selection_finds_exactly_the_overlapping_patches(random_patches: tuple) -> None:
    coords, scores, footprint = random_patches
    patches = PatchSet(coords, scores, footprint)
    xs, ys, _ = patches.intersecting(300, 200, 420, 290)
    expected = ((coords[:, 0] < 420) & (coords[:, 0] + footprint > 300)
                & (coords[:, 1] < 290) & (coords[:, 1] + footprint > 200))
    assert sorted(zip(xs.tolist(), ys.tolist(), strict=True)) == sorted(
        map(tuple, coords[expected].tolist()))
    cells = window_cells([patches], 300, 200, 420, 290)
    assert cells.x_edges[0] == 300 and cells.x_edges[-1] == 420
    assert cells.values.shape == (cells.y_edges.size - 1, cells.x_edges.size - 1)


@pytest.mark.parametrize("downsample", [1.0, 4.0, 3.0])
def test_uint8_codes_equal_the_rendered_scores(random_patches: tuple, downsample: float
                                               ) -> None:
    patches = [PatchSet(*random_patches)]
    width, height = int(-(-1000 // downsample)), int(-(-800 // downsample))
    tiles = CodeTiles(patches, (1000, 800))
    for x, y, w, h in iter_windows(width, height, 48):
        expected = to_uint8(render(patches, x * downsample, y * downsample, w, h, downsample))
        assert np.array_equal(tiles(x, y, w, h, downsample), expected)
        assert np.array_equal(render_uint8(patches, x * downsample, y * downsample, w, h,
                                           downsample), expected)


def test_uniform_windows_are_recognised_without_pixels() -> None:
    patches = [PatchSet(np.array([[0, 0]]), [0.5], 512)]
    inside = render_uint8(patches, 0, 0, 256, 256, 1.0)
    assert inside.strides == (0, 0) and (inside == to_uint8(np.float32(0.5))).all()
    outside = render_uint8(patches, 600, 600, 64, 64, 1.0)
    assert outside.strides == (0, 0) and (outside == NO_DATA).all()
    edge = render_uint8(patches, 448, 0, 128, 64, 1.0)
    assert edge.strides != (0, 0) and (edge[:, :64] > 0).all() and (edge[:, 64:] == 0).all()


def test_uint8_round_trip() -> None:
    values = np.array([0.0, 0.25, 1.0, np.nan, 1.7, -0.2], dtype=np.float32)
    codes = to_uint8(values)
    assert codes.tolist() == [1, 65, 255, 0, 255, 1]
    back = from_uint8(codes)
    np.testing.assert_allclose(back[:3], values[:3], atol=1 / 508)
    assert np.isnan(back[3])


def test_percentile_normalisation() -> None:
    scores = np.arange(101, dtype=float)
    values, legend = normalise(scores, "percentile", (10.0, 90.0))
    assert values[10] == 0.0 and values[90] == 1.0 and values[50] == pytest.approx(0.5)
    assert (values[:10] == 0).all() and (values[91:] == 1).all()
    assert "percentile" in legend and "10" in legend and "90" in legend
    assert normalise(np.full(5, 0.3), "percentile")[0].tolist() == [0.5] * 5


def test_rank_normalisation_is_uniform_and_applies_to_new_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=200)
    normaliser = fit_normaliser(scores, "rank")
    values = normaliser(scores)
    np.testing.assert_allclose(np.sort(values), np.linspace(0, 1, 200), atol=1e-6)
    assert np.argmax(values) == np.argmax(scores)
    tied = fit_normaliser(np.array([1.0, 2.0, 2.0, 3.0]), "rank")
    np.testing.assert_allclose(tied(np.array([1.0, 2.0, 3.0])), [0.0, 0.5, 1.0])
    between = normaliser(np.array([np.median(scores), scores.max() + 1, scores.min() - 1]))
    assert between[0] == pytest.approx(0.5, abs=0.01) and between[1] == 1 and between[2] == 0
    assert "rank" in normaliser.legend and "200" in normaliser.legend


def test_absolute_normalisation_keeps_probabilities() -> None:
    values, legend = normalise(np.array([0.1, 0.8, 1.3, -0.1]), "absolute",
                               score_name="probability")
    np.testing.assert_allclose(values, [0.1, 0.8, 1.0, 0.0])
    assert legend.startswith("probability as stored")


def test_normalisation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown normalisation"):
        fit_normaliser(np.ones(3), "zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no scores"):
        fit_normaliser(np.ones(0))
    with pytest.raises(ValueError, match="non-finite"):
        fit_normaliser(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="percentiles"):
        fit_normaliser(np.ones(3), "percentile", (50.0, 10.0))


def test_patch_sets_are_validated() -> None:
    with pytest.raises(ValueError, match="coords"):
        PatchSet(np.zeros((3, 3), dtype=int), np.zeros(3), 16)
    with pytest.raises(ValueError, match="coords"):
        PatchSet(np.zeros((3, 2)), np.zeros(3), 16)
    with pytest.raises(ValueError, match="2 scores for 3"):
        PatchSet(np.zeros((3, 2), dtype=int), np.zeros(2), 16)
    with pytest.raises(ValueError, match="footprint"):
        PatchSet(np.zeros((3, 2), dtype=int), np.zeros(3), 0)
    with pytest.raises(ValueError, match="finite"):
        PatchSet(np.zeros((1, 2), dtype=int), [np.inf], 16)


def test_colormaps() -> None:
    values = np.array([[0.0, 1.0, np.nan]], dtype=np.float32)
    for name in PERCEPTUAL_COLORMAPS:
        rgba = colorize(values, name)
        assert rgba.dtype == np.uint8 and rgba.shape == (1, 3, 4)
        expected = np.rint(np.array(colormaps[name]([0.0, 1.0])) * 255)
        np.testing.assert_array_equal(rgba[0, :2], expected)
        assert rgba[0, 2].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="perceptually uniform"):
        colorize(values, "jet")


def test_threshold_regions_with_a_hole_in_level0_coordinates() -> None:
    raster = np.full((40, 60), np.nan, dtype=np.float32)
    raster[5:25, 5:35] = 0.9
    raster[10:15, 10:20] = 0.2             # a hole
    raster[30:36, 45:55] = 0.7             # a second, smaller region
    raster[0:3, 50:60] = 0.5               # below the threshold
    regions = threshold_regions(raster, 0.65, downsample=8.0, origin=(100.0, 200.0))
    assert len(regions) == 2
    big, small = regions
    assert len(big.holes) == 1 and not small.holes
    polygon = Polygon(big.exterior, list(big.holes))
    assert polygon.is_valid
    pixel = 8.0 * 8.0
    assert big.area == pytest.approx((20 * 30 - 5 * 10) * pixel, rel=0.01)
    assert polygon.area == pytest.approx(big.area)
    outline = box(100 + 5 * 8, 200 + 5 * 8, 100 + 35 * 8, 200 + 25 * 8)
    assert polygon.symmetric_difference(outline).area == pytest.approx(5 * 10 * pixel, rel=0.02)
    assert small.mean_score == pytest.approx(0.7) and small.max_score == pytest.approx(0.7)
    assert big.max_score == pytest.approx(0.9)
    assert big.mean_score == pytest.approx(0.9)
    assert threshold_regions(raster, 0.95) == []


def test_threshold_regions_follow_the_rendered_map() -> None:
    rng = np.random.default_rng(3)
    xs, ys = np.meshgrid(np.arange(0, 2048, 128), np.arange(0, 2048, 128))
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    scores = np.where((coords[:, 0] >= 512) & (coords[:, 0] < 1024) & (coords[:, 1] < 640),
                      0.9, rng.random(len(coords)) * 0.5)
    raster = render_slide([PatchSet(coords, scores, 128)], 256, 256, 8.0)
    regions = threshold_regions(raster, 0.65, 8.0)
    assert len(regions) == 1
    lesion = box(512, 0, 1024, 640)
    shape = Polygon(regions[0].exterior, list(regions[0].holes))
    assert shape.intersection(lesion).area / shape.union(lesion).area > 0.99
    mask = raster >= 0.65
    assert ndimage.label(mask)[1] == 1
