"""The fast patch reader returns exactly what read_region + resize would, faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsi


def _reference(slide: wsi.Slide, spec: wsi.GridSpec, coords: np.ndarray) -> np.ndarray:
    patches = []
    for x, y in coords:
        patch = slide.read_region((int(x), int(y)), spec.level, (spec.read_size, spec.read_size))
        if spec.needs_resize:
            patch = np.asarray(Image.fromarray(patch).resize(
                (spec.patch_size, spec.patch_size), Image.Resampling.BILINEAR))
        patches.append(patch)
    return np.stack(patches)


@pytest.mark.parametrize(("fixture", "target_mpp", "patch_size"), [
    ("real_svs", 0.5, 256),      # 240 px tiles: every patch spans several tiles
    ("real_svs", 1.0, 224),      # resized from level 0
    ("large_svs", 0.5, 256),     # tile-aligned: one tile per patch
    ("large_svs", 2.0, 256),     # a lower pyramid level
    ("generic_tiff", 0.5, 300),
    ("ome_tiff", 0.5, 256),      # pyramid in SubIFDs
])
def test_reader_matches_read_region(fixture: str, target_mpp: float, patch_size: int,
                                    request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    slide = wsi.open_slide(path)
    tissue = wsi.detect_tissue(slide)
    settings = wsi.GridSettings(target_mpp=target_mpp, patch_size=patch_size)
    spec = wsi.plan_grid(slide, settings)
    grid = wsi.build_grid(tissue, spec, settings)
    coords = grid.coords[:: max(1, len(grid) // 40)]
    coords = np.vstack([coords, [[slide.dimensions[0] - 100, slide.dimensions[1] - 50]]])
    with wsi.PatchReader(slide, spec) as reader:
        assert reader.uses_tile_decoder
        batch = reader.read_batch(coords)
    assert batch.shape == (len(coords), patch_size, patch_size, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, _reference(slide, spec, coords))


def test_reader_falls_back_to_the_backend_for_dicom(dicom_wsi: Path) -> None:
    slide = wsi.open_slide(dicom_wsi)
    spec = wsi.plan_grid(slide, wsi.GridSettings())
    coords = np.array([[0, 0], [512, 768]], dtype=np.int64)
    with wsi.PatchReader(slide, spec) as reader:
        assert not reader.uses_tile_decoder
        np.testing.assert_array_equal(reader.read_batch(coords), _reference(slide, spec, coords))


def test_iter_batches_streams_in_order(real_svs: Path) -> None:
    slide = wsi.open_slide(real_svs)
    spec = wsi.plan_grid(slide, wsi.GridSettings())
    coords = np.array([[x, y] for y in range(0, 2967, 256) for x in range(0, 2220, 256)])
    with wsi.PatchReader(slide, spec, cache_bytes=1) as reader:
        batches = list(reader.iter_batches(coords, 16))
    assert [len(b) for b in batches][:-1] == [16] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate(batches), _reference(slide, spec, coords))


def test_truncated_tiles_raise_a_read_error(tmp_path: Path, small_svs: Path) -> None:
    """A file whose header survives but whose tiles are cut off opens (tiffslide) and then
    fails with SlideReadError naming the file, through both read paths."""
    from tests.builders import build_tile_truncated_svs

    path = build_tile_truncated_svs(tmp_path, small_svs)
    slide = wsi.open_slide(path)
    spec = wsi.plan_grid(slide, wsi.GridSettings())
    bottom = [[0, slide.dimensions[1] - 256]]
    with pytest.raises(wsi.SlideReadError, match="tile-truncated"):
        slide.read_region((0, slide.dimensions[1] - 256), 0, (256, 256))
    with wsi.PatchReader(slide, spec) as reader, pytest.raises(wsi.SlideReadError):
        reader.read_batch(np.array(bottom))
