"""Tissue detection, tile grids and their storage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import shapely
import zarr
from scipy import ndimage as ndi
from shapely.geometry import box, shape

import wsi
from tests import builders
from wsi.tiling import _box_fractions
from wsi.tissue import hsv_saturation_value


def _grid(path: Path, backend: str = "auto", **grid_options: float) -> tuple[wsi.Slide,
                                                                          wsi.TissueMask,
                                                                          wsi.TileGrid]:
    slide = wsi.open_slide(path, backend)
    tissue = wsi.detect_tissue(slide)
    settings = wsi.GridSettings(**grid_options)
    return slide, tissue, wsi.build_grid(tissue, wsi.plan_grid(slide, settings), settings)


def _reference_tissue(slide: wsi.Slide, mpp: float = 2.0) -> np.ndarray:
    """An independent, finer tissue mask: saturated pixels, specks under 0.005 mm² removed."""
    saturation, _ = hsv_saturation_value(slide.thumbnail(target_mpp=mpp))
    mask = ndi.binary_opening(saturation > 0.15)
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes * (mpp * 1e-3) ** 2 >= 0.005
    keep[0] = False
    return keep[labels]


def test_default_settings_find_tissue_on_the_small_real_biopsy(real_svs: Path) -> None:
    """CLAM's default preset finds nothing here; slidepipe's physical-unit defaults do."""
    _slide, tissue, grid = _grid(real_svs)
    assert 0.3 < tissue.area_mm2 < 1.2
    assert len(grid) >= 30


def test_grid_covers_the_real_tissue_and_nothing_else(real_svs: Path) -> None:
    slide, _, grid = _grid(real_svs)
    size = grid.spec.patch_size_level0
    with wsi.PatchReader(slide, grid.spec) as reader:
        batch = reader.read_batch(grid.coords)
    white = wsi.qc.white_fraction(batch)
    assert white.max() < 0.97, "a patch lies on white background"
    reference = _reference_tissue(slide)
    scale = slide.dimensions[0] / reference.shape[1]
    covered = np.zeros_like(reference)
    for x, y in grid.coords:
        covered[int(y / scale):int(np.ceil((y + size) / scale)),
                int(x / scale):int(np.ceil((x + size) / scale))] = True
    coverage = (reference & covered).sum() / reference.sum()
    assert coverage > 0.95, f"only {coverage:.1%} of the tissue lies under patches"
    labels, count = ndi.label(reference)
    for index in range(1, count + 1):
        component = labels == index
        if component.sum() * (2e-3) ** 2 >= 0.01:  # pieces of at least 0.01 mm²
            assert (component & covered).any(), f"tissue piece {index} has no patch"


@pytest.mark.parametrize("fixture", ["real_svs", "generic_tiff"])
def test_grid_is_identical_whichever_backend_reads(fixture: str,
                                                   request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    _, mask_a, grid_a = _grid(path, "openslide")
    _, mask_b, grid_b = _grid(path, "tiffslide")
    np.testing.assert_array_equal(mask_a.mask, mask_b.mask)
    np.testing.assert_array_equal(grid_a.coords, grid_b.coords)
    np.testing.assert_array_equal(grid_a.tissue_fraction, grid_b.tissue_fraction)


def test_grid_on_large_slide_stays_on_the_tissue_blocks(large_svs: Path) -> None:
    _slide, _tissue, grid = _grid(large_svs)
    size = grid.spec.patch_size_level0
    blocks = [box(x, y, x + w, y + h) for x, y, w, h in builders.large_svs_boxes()]
    patches = shapely.box(grid.coords[:, 0], grid.coords[:, 1], grid.coords[:, 0] + size,
                          grid.coords[:, 1] + size)
    union = shapely.union_all(blocks)
    assert shapely.intersects(patches, union).all(), "a patch lies outside every tissue block"
    for block in blocks:
        assert shapely.intersects(patches, block).sum() >= 20
    assert grid.coords.dtype == np.int64 and grid.coords.shape[1] == 2


def test_grid_order_is_row_major_and_deterministic(real_svs: Path) -> None:
    _, _, grid_a = _grid(real_svs)
    _, _, grid_b = _grid(real_svs)
    np.testing.assert_array_equal(grid_a.coords, grid_b.coords)
    order = np.lexsort((grid_a.coords[:, 0], grid_a.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(grid_a)))


def test_summed_area_fractions_equal_brute_force() -> None:
    rng = np.random.default_rng(7)
    mask = ndi.binary_dilation(rng.random((97, 131)) > 0.97, iterations=3)
    downsample = (16.3, 16.1)
    xs = np.arange(0, int(131 * 16.3), 200, dtype=np.int64)
    ys = np.arange(0, int(97 * 16.1), 200, dtype=np.int64)
    fast = _box_fractions(mask, downsample, xs, ys, 256)
    padded = np.zeros((200, 200), dtype=bool)
    padded[:97, :131] = mask
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            x0, x1 = round(x / 16.3), max(round((x + 256) / 16.3), round(x / 16.3) + 1)
            y0, y1 = round(y / 16.1), max(round((y + 256) / 16.1), round(y / 16.1) + 1)
            assert fast[i, j] == pytest.approx(padded[y0:y1, x0:x1].mean(), abs=1e-6)


def test_resolution_choice(large_svs: Path, real_svs: Path) -> None:
    with wsi.open_slide(large_svs) as slide:
        native = wsi.plan_grid(slide, wsi.GridSettings(target_mpp=0.5))
        assert (native.level, native.read_size, native.patch_size_level0) == (0, 256, 256)
        level1 = wsi.plan_grid(slide, wsi.GridSettings(target_mpp=2.0))
        assert (level1.level, level1.read_size, level1.patch_size_level0) == (1, 256, 1024)
        resized = wsi.plan_grid(slide, wsi.GridSettings(target_mpp=1.0))
        assert (resized.level, resized.read_size) == (0, 513)
        assert resized.needs_resize
        by_magnification = wsi.plan_grid(slide, wsi.GridSettings(magnification=5))
        assert by_magnification == level1
    with wsi.open_slide(real_svs) as slide, pytest.raises(wsi.ResolutionUnavailableError):
        wsi.plan_grid(slide, wsi.GridSettings(target_mpp=0.25))


def test_blank_slide_gives_an_empty_grid_and_a_warning(blank_svs: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _, tissue, grid = _grid(blank_svs)
    assert tissue.is_empty and len(grid) == 0
    assert "no patch" in caplog.text


def test_include_and_exclude_annotations(real_svs: Path, tmp_path: Path) -> None:
    _, full, _ = _grid(real_svs)
    half = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Region"}},
        "geometry": {"type": "Polygon",
                     "coordinates": [[[0, 0], [2220, 0], [2220, 1480], [0, 1480], [0, 0]]]}}]}
    path = tmp_path / "top.geojson"
    path.write_text(json.dumps(half))
    slide = wsi.open_slide(real_svs)
    include = wsi.detect_tissue(slide, wsi.TissueSettings(include_annotations=path))
    exclude = wsi.detect_tissue(slide, wsi.TissueSettings(exclude_annotations=path))
    rows = include.mask.shape[0]
    assert not include.mask[rows // 2 + 2:].any() and include.mask[: rows // 2 - 2].any()
    assert not exclude.mask[: rows // 2 - 2].any()
    assert include.mask.sum() + exclude.mask.sum() == pytest.approx(full.mask.sum(), abs=200)
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(wsi.AnnotationError, match=r"bad\.geojson"):
        wsi.detect_tissue(slide, wsi.TissueSettings(include_annotations=tmp_path / "bad.geojson"))


def test_tissue_geojson_is_valid_level0(real_svs: Path) -> None:
    slide, tissue, _ = _grid(real_svs)
    collection = json.loads(json.dumps(tissue.to_geojson()))
    assert collection["type"] == "FeatureCollection" and collection["features"]
    total = 0.0
    for feature in collection["features"]:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid
        assert feature["properties"]["objectType"] == "annotation"
        min_x, min_y, max_x, max_y = geometry.bounds
        assert min_x >= 0 and min_y >= 0
        assert max_x <= slide.dimensions[0] + 1 and max_y <= slide.dimensions[1] + 1
        total += geometry.area
    area_mm2 = total * (slide.level0_mpp * 1e-3) ** 2
    assert area_mm2 == pytest.approx(tissue.area_mm2, rel=0.1)


def test_pen_marks_are_flagged_and_filterable(real_svs: Path, tmp_path: Path) -> None:
    """Draw a green marker stroke across real tissue; patches under it carry the flag."""
    pixels = builders.real_tissue().copy()
    pixels[1400:1480, :] = (40, 150, 60)
    path = tmp_path / "pen.tif"
    import tifffile

    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
    _, _, grid = _grid(path)
    on_stroke = (grid.coords[:, 1] <= 1400) & (grid.coords[:, 1] + 256 >= 1480)
    assert grid.measurements["pen_fraction"][on_stroke].min() > 0.2
    _, _, clean = _grid(real_svs)
    assert np.median(clean.measurements["pen_fraction"]) < 0.02
    _, _, filtered = _grid(path, max_pen_fraction=0.2)
    assert len(filtered) < len(grid)


def test_grid_storage_round_trip(real_svs: Path, tmp_path: Path) -> None:
    slide, _, grid = _grid(real_svs)
    wsi.save_grid(grid, tmp_path, slide_name="CMU-1-Small-Region",
                  level_dimensions=[list(d) for d in slide.level_dimensions],
                  provenance={"slide_hash": slide.content_hash})
    loaded = wsi.load_grid(tmp_path)
    np.testing.assert_array_equal(loaded.coords, grid.coords)
    assert loaded.spec == grid.spec
    group = zarr.open_group(tmp_path / "grid.zarr", mode="r")
    assert group.attrs["provenance"]["slide_hash"] == slide.content_hash
    with h5py.File(tmp_path / "coords.h5", "r") as handle:
        coords = handle["coords"]
        np.testing.assert_array_equal(coords[:], grid.coords)
        assert coords.attrs["patch_size"] == 256
        assert coords.attrs["patch_size_level0"] == 256
        assert coords.attrs["patch_level"] == 0
        assert coords.attrs["target_mpp"] == 0.5
        assert coords.attrs["level0_mpp"] == pytest.approx(0.499)
    assert json.loads((tmp_path / "provenance.json").read_text())["num_patches"] == len(grid)
