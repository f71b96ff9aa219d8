"""The procedural H&E slide generator: determinism, window and level consistency, ground truth,
morphology of lesions, written slides and the demo cohort."""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import tiffslide
from skimage.color import rgb2hed

from pipelines.synthetic import (
    LESIONS_SUFFIX,
    SyntheticSlideSpec,
    SyntheticTissue,
    make_cohort,
    read_labels,
    write_synthetic_slide,
)
from wsi.geojson import read_polygons

#: Largest mean absolute difference (uint8) between a level rendering and level 0 shrunk.
MAX_LEVEL_MAD = 8.0
#: Largest per-channel mean difference between them: no level is tinted or darkened.
MAX_LEVEL_BIAS = 3.0
#: Largest mean absolute error between written (JPEG) and rendered pixels.
MAX_JPEG_MAE = 6.0


def _box_shrink(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image.astype(np.float64).reshape(h, factor, w, factor, 3).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def positive() -> SyntheticTissue:
    """A 4096 px square positive slide with two lesions."""
    return SyntheticTissue(SyntheticSlideSpec("pos", 4096, 4096, seed=7, n_lesions=2,
                                              lesion_radius_um=(150.0, 300.0)))


@pytest.fixture(scope="module")
def overview(positive: SyntheticTissue) -> np.ndarray:
    """The whole positive slide rendered at downsample 4."""
    return positive(0, 0, 1024, 1024, 4.0)


def _lesion_edge_origin(tissue: SyntheticTissue, size: int) -> tuple[int, int]:
    """Top-left of a ``size`` window centred on the right-hand edge of the first lesion."""
    lesion = tissue.lesions[0]
    return int(lesion.x + lesion.radius) - size // 2, int(lesion.y) - size // 2


def test_same_spec_renders_same_pixels(positive: SyntheticTissue) -> None:
    x, y = _lesion_edge_origin(positive, 384)
    again = SyntheticTissue(positive.spec)
    first = positive(x, y, 384, 384, 1.0)
    assert first.dtype == np.uint8 and first.shape == (384, 384, 3)
    np.testing.assert_array_equal(first, again(x, y, 384, 384, 1.0))
    np.testing.assert_array_equal(positive(x // 4, y // 4, 200, 100, 4.0),
                                  again(x // 4, y // 4, 200, 100, 4.0))
    other = SyntheticTissue(SyntheticSlideSpec("pos", 4096, 4096, seed=8, n_lesions=2))
    assert not np.array_equal(other(x, y, 384, 384, 1.0), first)


@pytest.mark.parametrize("downsample", [1.0, 4.0, 16.0])
def test_split_windows_render_identically(positive: SyntheticTissue, downsample: float) -> None:
    x, y = _lesion_edge_origin(positive, 512)
    x, y = int(x // downsample), int(y // downsample)
    whole = positive(x, y, 512, 512, downsample)
    halves = np.concatenate([positive(x, y, 256, 512, downsample),
                             positive(x + 256, y, 256, 512, downsample)], axis=1)
    np.testing.assert_array_equal(whole, halves)
    rows = np.concatenate([positive(x, y, 512, 200, downsample),
                           positive(x, y + 200, 512, 312, downsample)], axis=0)
    np.testing.assert_array_equal(whole, rows)
    # a fresh renderer (empty nucleus cache) agrees too
    fresh = SyntheticTissue(positive.spec)
    np.testing.assert_array_equal(fresh(x + 100, y + 37, 99, 301, downsample),
                                  whole[37:338, 100:199])


@pytest.mark.parametrize(("downsample", "span"), [(4, 1024), (16, 2048)])
def test_levels_look_like_level0_shrunk(positive: SyntheticTissue, downsample: int,
                                        span: int) -> None:
    x, y = _lesion_edge_origin(positive, span)
    x -= x % downsample
    y -= y % downsample
    shrunk = _box_shrink(positive(x, y, span, span, 1.0), downsample)
    n = span // downsample
    level = positive(x // downsample, y // downsample, n, n, float(downsample)).astype(np.float64)
    assert np.abs(level - shrunk).mean() < MAX_LEVEL_MAD
    assert np.abs((level - shrunk).reshape(-1, 3).mean(axis=0)).max() < MAX_LEVEL_BIAS


def test_coarse_levels_average_finer_ones(positive: SyntheticTissue) -> None:
    fine = _box_shrink(positive(0, 0, 256, 256, 16.0), 4)
    coarse = positive(0, 0, 64, 64, 64.0).astype(np.float64)
    assert np.abs(coarse - fine).mean() < MAX_LEVEL_MAD
    assert np.abs((coarse - fine).reshape(-1, 3).mean(axis=0)).max() < MAX_LEVEL_BIAS


@pytest.mark.parametrize("seed", range(6))
def test_tissue_covers_30_to_60_percent(seed: int) -> None:
    tissue = SyntheticTissue(SyntheticSlideSpec("s", 2048, 1536, seed=seed))
    mask = tissue.tissue_mask(8)
    assert mask.shape == (192, 256)
    assert 0.30 <= mask.mean() <= 0.60
    assert not mask[0].any() and not mask[-1].any()  # glass all round


def test_rendered_tissue_matches_its_mask(positive: SyntheticTissue,
                                          overview: np.ndarray) -> None:
    mask = positive.tissue_mask(4)
    glass = overview.min(axis=2) > 215
    assert (mask == ~glass).mean() > 0.9
    glass_pixels = overview[~mask]
    assert 238 <= glass_pixels.mean() <= 252
    assert np.ptp(glass_pixels.mean(axis=0)) < 8  # colourless glass
    assert glass_pixels.std() > 0.3  # with a little noise


def test_stroma_is_pink_and_nuclei_purple(positive: SyntheticTissue,
                                          overview: np.ndarray) -> None:
    normal = positive.tissue_mask(4) & ~positive.lesion_mask(4)
    red, green, blue = overview[normal & (overview.min(axis=2) < 215)].mean(axis=0)
    assert red > blue > green  # eosin pink
    assert 185 < red < 240 and 95 < green < 165
    x, y = _lesion_edge_origin(positive, 512)
    crop = positive(x, y, 512, 512, 1.0).reshape(-1, 3).astype(int)
    dark = crop[crop.sum(axis=1) < 330]  # nuclei, as in _nuclear_fraction
    assert len(dark) > 1000
    r, g, b = dark.mean(axis=0)
    assert b > r > g  # haematoxylin purple-blue


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_lesions_lie_inside_tissue(seed: int) -> None:
    tissue = SyntheticTissue(SyntheticSlideSpec("s", 3072, 3072, seed=seed, n_lesions=3))
    assert len(tissue.lesions) == 3
    lesions, inside = tissue.lesion_mask(8), tissue.tissue_mask(8)
    assert lesions.any()
    assert not (lesions & ~inside).any()
    polygons = tissue.lesion_polygons()
    assert len(polygons) == len(tissue.lesion_polygons_level0) == 3
    assert all(p.is_valid for p in polygons)
    assert sum(p.area for p in polygons) == pytest.approx(lesions.sum() * 64, rel=0.05)
    for points in tissue.lesion_polygons_level0:
        rows, cols = (points[:, 1] // 8).astype(int), (points[:, 0] // 8).astype(int)
        assert inside[rows, cols].all()


def test_lesion_radius_follows_the_spec() -> None:
    spec = SyntheticSlideSpec("s", 8192, 8192, seed=5, n_lesions=1,
                              lesion_radius_um=(300.0, 800.0))
    (lesion,) = SyntheticTissue(spec).lesions
    assert 300 / spec.mpp * 0.85**3 <= lesion.radius <= 800 / spec.mpp


def test_negative_slide_has_no_lesions() -> None:
    tissue = SyntheticTissue(SyntheticSlideSpec("neg", 2048, 2048, seed=3))
    assert tissue.spec.label == 0
    assert tissue.lesions == ()
    assert tissue.lesion_polygons_level0 == []
    assert not tissue.lesion_mask(8).any()
    assert tissue.lesion_feature_collection()["features"] == []


def test_lesions_hold_more_and_darker_haematoxylin(positive: SyntheticTissue,
                                                   overview: np.ndarray) -> None:
    lesion = positive.lesion_mask(4)
    normal = positive.tissue_mask(4) & ~lesion
    haematoxylin = rgb2hed(overview)[..., 0]
    assert haematoxylin[lesion].mean() > haematoxylin[normal].mean() + 0.03
    brightness = overview.astype(float).mean(axis=2)
    assert brightness[lesion].mean() < brightness[normal].mean() - 20
    # at full resolution a far larger share of a lesion than of normal tissue is nuclei
    centre = positive.lesions[0]
    tumour = _nuclear_fraction(positive(int(centre.x) - 128, int(centre.y) - 128, 256, 256, 1.0))
    blocks = normal[: 1024 // 64 * 64, : 1024 // 64 * 64].reshape(16, 64, 16, 64).all(axis=(1, 3))
    rows, cols = np.nonzero(blocks)
    assert len(rows) >= 3
    stroma = max(_nuclear_fraction(positive(int(c) * 256, int(r) * 256, 256, 256, 1.0))
                 for r, c in zip(rows[:3], cols[:3], strict=True))
    assert tumour > 0.2
    assert tumour > 3 * stroma


def _nuclear_fraction(rgb: np.ndarray) -> float:
    """Share of pixels dark enough to be haematoxylin-stained nuclei."""
    return float((rgb.astype(int).sum(axis=2) < 330).mean())


def test_level0_window_renders_fast(positive: SyntheticTissue) -> None:
    x, y = _lesion_edge_origin(positive, 512)
    positive(x, y, 512, 512, 1.0)
    timings = []
    for step in range(5):
        start = time.perf_counter()
        positive(x + 512 * (step - 2), y, 512, 512, 1.0)
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[2] < 0.1


def test_windows_past_the_slide_are_glass(positive: SyntheticTissue) -> None:
    beyond = positive(4096, 4096, 64, 64, 1.0)
    assert beyond.min() > 225
    with pytest.raises(ValueError):
        positive(0, 0, 0, 10, 1.0)
    with pytest.raises(ValueError):
        positive(0, 0, 10, 10, 0.0)
    with pytest.raises(ValueError):
        positive.tissue_mask(0)


@pytest.mark.parametrize("changes", [
    {"width": 10}, {"mpp": 0.0}, {"n_lesions": -1}, {"tissue_fraction": 0.99},
    {"lesion_radius_um": (500.0, 100.0)}, {"slide_id": ""},
])
def test_invalid_specs_are_refused(changes: dict) -> None:
    values = {"slide_id": "s", "width": 1024, "height": 1024, **changes}
    with pytest.raises(ValueError):
        SyntheticSlideSpec(**values)


def test_written_svs_opens_with_metadata_and_pixels(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec("one", 1536, 1024, seed=4, n_lesions=1, mpp=0.25)
    path = write_synthetic_slide(spec, tmp_path)
    assert path == tmp_path / "one.svs"
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert slide.level_dimensions == ((1536, 1024), (384, 256), (96, 64))
        got = np.asarray(slide.read_region((512, 256), 0, (512, 512)).convert("RGB"))
        coarse = np.asarray(slide.read_region((0, 0), 1, (384, 256)).convert("RGB"))
    tissue = SyntheticTissue(spec)
    assert np.abs(got.astype(int) - tissue(512, 256, 512, 512, 1.0)).mean() < MAX_JPEG_MAE
    assert np.abs(coarse.astype(int) - tissue(0, 0, 384, 256, 4.0)).mean() < MAX_JPEG_MAE


def test_written_generic_tiff_is_a_pyramid(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec("gen", 1024, 1024, seed=2)
    path = write_synthetic_slide(spec, tmp_path, fmt="tiff")
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((1024, 1024), (256, 256), (64, 64))
        assert float(slide.properties[tiffslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_cohort_writes_labelled_openable_slides(tmp_path: Path) -> None:
    labels = make_cohort(tmp_path / "a", 4, size=(1024, 768), seed=3)
    assert labels == tmp_path / "a" / "labels.csv"
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["slide_id", "patient_id", "label", "path"]
    assert sorted(row["label"] for row in rows) == ["negative"] * 2 + ["positive"] * 2
    assert len({row["patient_id"] for row in rows}) == 4
    for row in read_labels(labels):
        path = Path(row["path"])
        with openslide.OpenSlide(path) as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
            assert slide.dimensions == (1024, 768)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        geojson = path.with_name(f"{row['slide_id']}{LESIONS_SUFFIX}")
        if row["label"] == "positive":
            polygons = read_polygons(geojson)
            assert 1 <= len(polygons) <= 3
            assert all(p.bounds[0] > 0 and p.bounds[2] < 1024 for p in polygons)
        else:
            assert not geojson.exists()
    again = make_cohort(tmp_path / "b", 4, size=(1024, 768), seed=3)
    for name in ["labels.csv", *(row["path"] for row in rows)]:
        assert _digest(labels.parent / name) == _digest(again.parent / name)


def test_cohort_lesions_match_geojson(tmp_path: Path) -> None:
    labels = make_cohort(tmp_path, 2, size=(1024, 1024), seed=5, positive_fraction=1.0)
    for row in read_labels(labels):
        polygons = read_polygons(Path(row["path"]).with_name(f"{row['slide_id']}"
                                                            f"{LESIONS_SUFFIX}"))
        with openslide.OpenSlide(row["path"]) as slide:
            rgb = np.asarray(slide.read_region((0, 0), 1, (256, 256)).convert("RGB"))
        # the annotated areas of the written slide are the dark, nuclei-packed ones
        centres = (np.arange(256) + 0.5) * 4
        xs, ys = np.meshgrid(centres, centres)
        annotated = np.zeros((256, 256), bool)
        for polygon in polygons:
            annotated |= shapely.contains_xy(polygon, xs, ys)
        stained = rgb.min(axis=2) < 215
        brightness = rgb.astype(float).mean(axis=2)
        assert (annotated & stained).sum() > 100
        assert brightness[annotated & stained].mean() < brightness[~annotated & stained].mean() - 20
