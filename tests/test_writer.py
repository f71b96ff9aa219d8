"""The slide writer and the test slides built with it, checked through OpenSlide, tiffslide and
tifffile directly (not through the ``wsi`` reading layer)."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from PIL import Image

from tests import builders
from wsi.writer import APERIO_JPEG, STAND_IN_IDENTIFIERS, TileEncoder, write_pyramid

#: Largest mean absolute error (uint8) accepted between written and source pixels (JPEG loss).
MAX_MAE = 6.0
#: Largest difference of per-channel means: catches swapped channels and YCbCr/RGB confusion.
MAX_CHANNEL_SHIFT = 2.0


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _assert_same_pixels(got: np.ndarray, want: np.ndarray) -> None:
    assert _mae(got, want) < MAX_MAE
    shift = np.abs(got.reshape(-1, 3).mean(0) - want.reshape(-1, 3).mean(0))
    assert shift.max() < MAX_CHANNEL_SHIFT


def _box_resize(pixels: np.ndarray, downsample: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    size = (round(width / downsample), round(height / downsample))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


# --- the large SVS ------------------------------------------------------------------------------


def test_large_svs_is_an_aperio_pyramid(large_svs: Path) -> None:
    with openslide.OpenSlide(large_svs) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert slide.level_count >= 3
        assert min(slide.dimensions) >= 40000
        assert slide.level_downsamples == pytest.approx(builders.LARGE_SVS_DOWNSAMPLES)
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.499)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.499)
        assert props["openslide.objective-power"] == "20"
        assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
        assert props["aperio.Filename"] == STAND_IN_IDENTIFIERS["Filename"]
        assert props["aperio.User"] == STAND_IN_IDENTIFIERS["User"]


def test_large_svs_label_and_macro(large_svs: Path) -> None:
    with openslide.OpenSlide(large_svs) as slide:
        label = _rgb(slide.associated_images["label"])
        macro = _rgb(slide.associated_images["macro"])
    np.testing.assert_array_equal(label, builders.synthetic_label())  # LZW: lossless
    overview_side = builders.LARGE_SVS_SIZE[1] // builders.MACRO_DOWNSAMPLE
    assert macro.shape[0] == overview_side
    magenta = np.all(np.abs(macro.astype(int) - builders.LABEL_COLOUR) < 30, axis=2)
    assert magenta[:, : macro.shape[1] - overview_side].mean() > 0.3


@pytest.mark.parametrize("index", [0, 2, 5])
def test_large_svs_tissue_matches_real_tissue(large_svs: Path, index: int) -> None:
    block = builders.LARGE_SVS_LAYOUT[index]
    x, y, width, height = block.box()
    with openslide.OpenSlide(large_svs) as slide:
        got = _rgb(slide.read_region((x, y), 0, (width, height)))
    _assert_same_pixels(got, block.pixels())


def test_large_svs_reduced_level_matches_downsampled_tissue(large_svs: Path) -> None:
    block = builders.LARGE_SVS_LAYOUT[3]
    want = _box_resize(block.pixels(), 16)
    with openslide.OpenSlide(large_svs) as slide:
        level = slide.get_best_level_for_downsample(16)
        origin = (block.x, block.y)  # read_region takes level-0 coordinates
        got = _rgb(slide.read_region(origin, level, (want.shape[1], want.shape[0])))
    _assert_same_pixels(got, want)


def test_large_svs_layout_keeps_blocks_apart_on_the_slide() -> None:
    boxes = builders.large_svs_boxes()
    assert 6 <= len(boxes) <= 10
    assert any(w > h for _, _, w, h in boxes)  # some blocks are rotated
    for x, y, w, h in boxes:
        assert x >= 0 and x + w <= builders.LARGE_SVS_SIZE[0]
        assert y >= 0 and y + h <= builders.LARGE_SVS_SIZE[1]
    for (ax, ay, aw, ah), (bx, by, bw, bh) in itertools.combinations(boxes, 2):
        assert ax + aw < bx or bx + bw < ax or ay + ah < by or by + bh < ay


def test_large_svs_is_white_outside_the_blocks(large_svs: Path) -> None:
    downsample = builders.LARGE_SVS_DOWNSAMPLES[-1]
    with openslide.OpenSlide(large_svs) as slide:
        overview = _rgb(slide.read_region((0, 0), slide.level_count - 1,
                                          slide.level_dimensions[-1]))
        centre = _rgb(slide.read_region((16384, 16384), 0, (2048, 2048)))
    inside = np.zeros(overview.shape[:2], dtype=bool)
    margin = 8  # one JPEG block of ringing around each block's edge
    for x, y, w, h in builders.large_svs_boxes():
        x0, y0 = x // downsample - margin, y // downsample - margin
        x1, y1 = (x + w) // downsample + margin, (y + h) // downsample + margin
        inside[max(y0, 0):y1, max(x0, 0):x1] = True
    assert (overview[~inside] >= 250).mean() > 0.999
    assert overview[inside].mean() < 235  # the blocks hold tissue
    assert centre.min() >= 254  # the centre cell of the layout is empty glass


# --- the mosaic in other formats ----------------------------------------------------------------

MOSAIC_REGION = (1708, 2455, 1024, 1024)
"""A level-0 region across the centre of the mosaic, where the four mirrored copies meet."""


def _mosaic_region() -> np.ndarray:
    x, y, w, h = MOSAIC_REGION
    return builders.mosaic_tissue()[y:y + h, x:x + w]


def _check_mosaic_slide(slide: openslide.OpenSlide | tiffslide.TiffSlide, prefix: str) -> None:
    assert slide.dimensions == builders.mosaic_size()
    assert slide.level_count == len(builders.MOSAIC_DOWNSAMPLES)
    assert slide.level_downsamples == pytest.approx(builders.MOSAIC_DOWNSAMPLES, rel=0.01)
    assert float(slide.properties[f"{prefix}.mpp-x"]) == pytest.approx(0.499)
    assert float(slide.properties[f"{prefix}.mpp-y"]) == pytest.approx(0.499)
    x, y, w, h = MOSAIC_REGION
    _assert_same_pixels(_rgb(slide.read_region((x, y), 0, (w, h))), _mosaic_region())
    want = _box_resize(builders.mosaic_tissue(), 4)
    got = _rgb(slide.read_region((0, 0), 1, (want.shape[1], want.shape[0])))
    _assert_same_pixels(got, want)


def test_generic_tiff_opens_with_all_levels_in_tiffslide(generic_tiff: Path) -> None:
    with tiffslide.TiffSlide(generic_tiff) as slide:
        _check_mosaic_slide(slide, "tiffslide")


def test_generic_tiff_opens_in_openslide_with_mpp(generic_tiff: Path) -> None:
    """OpenSlide 4 derives mpp for generic TIFF from centimetre resolution tags."""
    with openslide.OpenSlide(generic_tiff) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        _check_mosaic_slide(slide, "openslide")


def test_ome_tiff_opens_with_all_levels_in_tiffslide(ome_tiff: Path) -> None:
    with tifffile.TiffFile(ome_tiff) as tiff:
        assert tiff.is_ome
        assert len(tiff.series[0].levels) == len(builders.MOSAIC_DOWNSAMPLES)
        assert len(tiff.pages.first.subifds or ()) == len(builders.MOSAIC_DOWNSAMPLES) - 1
        assert 'PhysicalSizeX="0.499"' in tiff.ome_metadata
    with tiffslide.TiffSlide(ome_tiff) as slide:
        _check_mosaic_slide(slide, "tiffslide")


def test_small_svs_opens_as_aperio(small_svs: Path) -> None:
    with openslide.OpenSlide(small_svs) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
        _check_mosaic_slide(slide, "openslide")


def test_dicom_wsi_opens_in_openslide_through_any_instance(dicom_wsi: Path) -> None:
    instances = sorted(dicom_wsi.iterdir())
    assert len(instances) >= 3 and all(p.suffix == ".dcm" for p in instances)
    for instance in instances:
        with openslide.OpenSlide(instance) as slide:
            assert slide.properties["openslide.vendor"] == "dicom"
            assert slide.dimensions == builders.mosaic_size()
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=1e-3)
    with openslide.OpenSlide(builders.dicom_instance(dicom_wsi)) as slide:
        assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
        _check_mosaic_slide(slide, "openslide")


def test_no_mpp_tiff_has_no_resolution(no_mpp_tiff: Path) -> None:
    with tifffile.TiffFile(no_mpp_tiff) as tiff:
        assert tiff.pages.first.resolutionunit == tifffile.RESUNIT.NONE
    with openslide.OpenSlide(no_mpp_tiff) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in slide.properties
        got = _rgb(slide.read_region((0, 0), 0, slide.dimensions))
    _assert_same_pixels(got, builders.real_tissue())
    with tiffslide.TiffSlide(no_mpp_tiff) as slide:
        assert slide.properties["tiffslide.mpp-x"] is None


def test_blank_svs_is_glass_without_tissue(blank_svs: Path) -> None:
    with openslide.OpenSlide(blank_svs) as slide:
        assert slide.dimensions == builders.mosaic_size()
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)
        pixels = _rgb(slide.read_region((0, 0), 0, (2048, 2048))).astype(int)
    assert pixels.min() >= 230
    assert (pixels.max(axis=2) - pixels.min(axis=2)).mean() < 8  # low saturation
    assert pixels.std() > 0.5  # not a flat fill


# --- broken inputs: what the libraries themselves do ---------------------------------------------


@pytest.mark.parametrize("fixture", ["truncated_svs", "tile_truncated_svs", "png_named_svs",
                                     "zero_byte_slide"])
def test_openslide_refuses_broken_files_at_open(fixture: str,
                                                request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(path)


def test_truncated_svs_loses_its_first_ifd(truncated_svs: Path, real_svs: Path) -> None:
    assert truncated_svs.stat().st_size == int(real_svs.stat().st_size * 0.6)
    with tifffile.TiffFile(truncated_svs) as tiff:
        assert len(tiff.pages) == 0


def test_tile_truncated_svs_opens_in_tiffslide_but_fails_to_read(tile_truncated_svs: Path) -> None:
    with tiffslide.TiffSlide(tile_truncated_svs) as slide:
        assert slide.dimensions == builders.mosaic_size()
        slide.read_region((0, 0), 0, (256, 256))  # the first tiles survived
        with pytest.raises(imagecodecs.Jpeg8Error):
            slide.read_region((0, 0), 0, slide.dimensions)


def test_corrupt_tile_svs_opens_and_fails_on_the_corrupt_tiles(corrupt_tile_svs: Path) -> None:
    x, y, _, _ = builders.corrupt_tile_box()
    with openslide.OpenSlide(corrupt_tile_svs) as slide:
        slide.read_region((0, 0), 0, (256, 256))
        with pytest.raises(openslide.OpenSlideError):
            slide.read_region((x, y), 0, (256, 256))
        with pytest.raises(openslide.OpenSlideError):  # the handle stays broken afterwards
            slide.read_region((0, 0), 0, (256, 256))


def test_unreadable_svs_has_mode_000(unreadable_svs: Path) -> None:
    assert stat.S_IMODE(unreadable_svs.stat().st_mode) == 0
    if os.access(unreadable_svs, os.R_OK):  # root ignores permission bits
        with openslide.OpenSlide(unreadable_svs) as slide:
            assert slide.dimensions == builders.mosaic_size()
    else:
        with pytest.raises(openslide.OpenSlideError):
            openslide.OpenSlide(unreadable_svs)


# --- the writer itself ------------------------------------------------------------------------

CROP_SIZE = (1000, 700)
"""An odd-sized crop of the real tissue, so every level has partial edge tiles."""


def _crop_canvas() -> builders.TissueCanvas:
    return builders.TissueCanvas(CROP_SIZE, (builders.TissueBlock(0, 0, "identity"),))


@pytest.mark.parametrize("fmt", ["svs", "tiff", "ome"])
def test_write_pyramid_round_trips_every_format(tmp_path: Path, fmt: str) -> None:
    canvas = _crop_canvas()
    path = write_pyramid(tmp_path / f"crop.{fmt}", canvas, CROP_SIZE, mpp=0.25, fmt=fmt,
                         downsamples=(1, 2, 4), tile_size=128)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((1000, 700), (500, 350), (250, 175))
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        for level, downsample in enumerate((1, 2, 4)):
            width, height = slide.level_dimensions[level]
            got = _rgb(slide.read_region((0, 0), level, (width, height)))
            _assert_same_pixels(got, canvas(0, 0, width, height, float(downsample)))


def test_svs_description_and_missing_metadata(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "bare.svs", _crop_canvas(), CROP_SIZE, mpp=None,
                         objective_power=None)
    with tifffile.TiffFile(path) as tiff:
        description = tiff.pages.first.description
    assert description.startswith("Aperio Image Library v12.0.0 \r\n1000x700 [0,0 1000x700]")
    assert "MPP" not in description and "AppMag" not in description
    assert "Filename = PATIENT-SECRET-0001" in description
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert "openslide.mpp-x" not in slide.properties
        assert "openslide.objective-power" not in slide.properties


def test_edge_tiles_are_padded_with_white(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "edge.tiff", _crop_canvas(), CROP_SIZE, mpp=0.25,
                         fmt="tiff", downsamples=(1,), tile_size=256)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        tiff.filehandle.seek(page.dataoffsets[-1])
        last = imagecodecs.jpeg8_decode(tiff.filehandle.read(page.databytecounts[-1]))
    valid_w, valid_h = CROP_SIZE[0] % 256, CROP_SIZE[1] % 256
    assert last.shape == (256, 256, 3)
    assert last[valid_h + 8:, :].min() >= 250
    assert last[:, valid_w + 8:].min() >= 250


def test_tile_encoder_reuses_uniform_tiles() -> None:
    encoder = TileEncoder(90, APERIO_JPEG)
    white = np.full((256, 256, 3), 255, dtype=np.uint8)
    first, second = encoder.encode(white), encoder.encode(white.copy())
    assert first is second and encoder.reused == 1
    tissue = np.ascontiguousarray(builders.real_tissue()[:256, :256])
    assert encoder.encode(tissue) is not encoder.encode(tissue)
    assert encoder.encoded == 3


def _white(x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (0, 100)}, "size"),
        ({"size": (100, -1)}, "size"),
        ({"tile_size": 100}, "tile_size"),
        ({"tile_size": 0}, "tile_size"),
        ({"downsamples": (2, 4)}, "start with 1"),
        ({"downsamples": ()}, "start with 1"),
        ({"downsamples": (1, 4, 4)}, "increase"),
        ({"downsamples": (1, 8, 4)}, "increase"),
        ({"downsamples": (1, 2.5)}, "integers"),
        ({"quality": 0}, "quality"),
        ({"mpp": -0.5}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"fmt": "png"}, "fmt"),
        ({"fmt": "tiff", "associated": {"label": np.zeros((4, 4, 3), np.uint8)}}, "svs"),
        ({"associated": {"thumbnail": np.zeros((4, 4, 3), np.uint8)}}, "thumbnail"),
        ({"associated": {"label": np.zeros((4, 4), np.uint8)}}, "uint8"),
        ({"objective_power": 0}, "objective_power"),
    ],
)
def test_write_pyramid_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"size": (512, 512), "mpp": 0.5, **kwargs}
    size = args.pop("size")
    with pytest.raises(ValueError, match=message):
        write_pyramid(tmp_path / "bad.svs", _white, size, **args)
    assert not (tmp_path / "bad.svs").exists()


def test_write_pyramid_rejects_a_wrongly_shaped_render(tmp_path: Path) -> None:
    def grey(x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        return np.zeros((height, width), dtype=np.uint8)

    with pytest.raises(ValueError, match="render"):
        write_pyramid(tmp_path / "grey.svs", grey, (300, 300), mpp=0.5)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
