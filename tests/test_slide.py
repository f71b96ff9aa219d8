"""Slide access: metadata, backends and fallback, pixels, hashing, privacy, bad inputs."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import wsi
from wsi.slide import composite_on_white


def test_real_svs_metadata(real_svs: Path) -> None:
    with wsi.open_slide(real_svs) as slide:
        assert slide.backend_name == "openslide"
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.objective_power == 20
        assert slide.fallback_reason is None


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_backends_agree_on_real_svs(real_svs: Path, backend: str) -> None:
    with wsi.open_slide(real_svs, backend) as slide, wsi.open_slide(real_svs, "openslide") as ref:
        assert slide.backend_name == backend
        assert slide.level_dimensions == ref.level_dimensions
        assert slide.mpp == pytest.approx(ref.mpp)
        assert slide.vendor == "aperio"
        region = slide.read_region((1000, 1500), 0, (300, 200))
        assert region.dtype == np.uint8 and region.shape == (200, 300, 3)
        np.testing.assert_array_equal(region, ref.read_region((1000, 1500), 0, (300, 200)))
        assert slide.content_hash == ref.content_hash


def test_out_of_bounds_is_white_for_every_backend(real_svs: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        with wsi.open_slide(real_svs, backend) as slide:
            region = slide.read_region((2100, 2900), 0, (300, 300))
            assert (region[100:, :] == 255).all() and (region[:, 150:] == 255).all()
            assert (region[:50, :100] < 250).any()  # real tissue pixels inside
            assert (slide.read_region((-500, -500), 0, (100, 100)) == 255).all()


def test_composite_on_white_uses_straight_alpha() -> None:
    rgba = np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [100, 50, 0, 128]]], dtype=np.uint8)
    out = composite_on_white(rgba)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [177, 152, 127]  # 0.502 * colour + 0.498 * white


def test_thumbnail_maps_to_level0(real_svs: Path, large_svs: Path) -> None:
    with wsi.open_slide(real_svs) as slide:
        thumb = slide.thumbnail(target_mpp=4.0)
        assert thumb.shape[1] == round(2220 * 0.499 / 4.0)
        assert slide.thumbnail(size=(200, 200)).shape[0] == 200
    with wsi.open_slide(large_svs) as slide:
        thumb = slide.thumbnail(size=(512, 512))
        assert thumb.shape[:2] == (512, 512)
        assert slide.best_level(64.0) == 3


def test_formats_open(large_svs: Path, generic_tiff: Path, ome_tiff: Path) -> None:
    with wsi.open_slide(large_svs) as slide:
        assert slide.vendor == "aperio" and slide.level_count >= 3
        assert min(slide.dimensions) >= 40000
        assert slide.mpp == pytest.approx((0.499, 0.499))
    with wsi.open_slide(generic_tiff, "tiffslide") as slide:
        assert slide.level_count >= 3 and slide.mpp == pytest.approx((0.499, 0.499), rel=1e-3)
    with wsi.open_slide(ome_tiff) as slide:
        assert slide.backend_name == "tiffslide"
        assert slide.level_count >= 3 and slide.mpp == pytest.approx((0.499, 0.499), rel=1e-3)


def test_dicom_wsi_opens_with_openslide(dicom_wsi: Path, small_svs: Path) -> None:
    with wsi.open_slide(dicom_wsi) as slide, wsi.open_slide(small_svs) as source:
        assert slide.backend_name == "openslide" and slide.vendor == "dicom"
        assert slide.dimensions == source.dimensions
        assert slide.mpp == pytest.approx(source.mpp, rel=1e-3)
        a = slide.read_region((1000, 1000), 0, (256, 256)).astype(int)
        b = source.read_region((1000, 1000), 0, (256, 256)).astype(int)
        assert np.abs(a - b).mean() < 2.0


def test_fallback_reason_recorded(tmp_path: Path) -> None:
    """OpenSlide does not read stripped (untiled) TIFFs; tiffslide does, and says why."""
    path = tmp_path / "stripped.tif"
    pixels = np.full((300, 400, 3), 200, dtype=np.uint8)
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with wsi.open_slide(path) as slide:
        assert slide.backend_name == "tiffslide"
        assert slide.fallback_reason and "openslide" in slide.fallback_reason
        assert slide.mpp == pytest.approx((0.5, 0.5))


def test_content_hash_is_stable_and_distinguishes(real_svs: Path, small_svs: Path,
                                                  tmp_path: Path) -> None:
    with wsi.open_slide(real_svs) as a, wsi.open_slide(real_svs, "tiffslide") as b:
        assert a.content_hash == b.content_hash
    copy = tmp_path / "copy.svs"
    copy.write_bytes(real_svs.read_bytes())
    with wsi.open_slide(copy) as c, wsi.open_slide(small_svs) as d:
        assert c.content_hash == a.content_hash
        assert d.content_hash != a.content_hash
    data = bytearray(copy.read_bytes())
    data[200] ^= 0xFF  # metadata in the header
    copy.write_bytes(bytes(data))
    assert wsi.open_slide(copy).content_hash != a.content_hash
    copy.write_bytes(real_svs.read_bytes() + b"\0")  # a re-written file of another size
    assert wsi.open_slide(copy).content_hash != a.content_hash


def test_phi_hidden_by_default(large_svs: Path) -> None:
    with wsi.open_slide(large_svs) as slide:
        safe = slide.properties()
        text = repr(safe) + repr(slide.summary())
        assert "jane.doe" not in text and "PATIENT-SECRET" not in text
        assert not any("label" in k or "macro" in k for k in safe)
        full = slide.properties(show_phi=True)
        assert any("jane.doe" in v for v in full.values())
        assert {"label", "macro"} <= set(slide.associated_names)
        assert slide.associated_image("label").ndim == 3
        with pytest.raises(KeyError, match="no associated image"):
            slide.associated_image("barcode")


@pytest.mark.parametrize("fixture", ["truncated_svs", "png_named_svs", "zero_byte_slide"])
def test_bad_files_raise_slide_open_error(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    with pytest.raises(wsi.SlideOpenError) as info:
        wsi.open_slide(path)
    assert str(path) in str(info.value)


def test_missing_file_and_empty_file_messages(tmp_path: Path, zero_byte_slide: Path) -> None:
    with pytest.raises(wsi.SlideOpenError, match="no such file"):
        wsi.open_slide(tmp_path / "absent.svs")
    with pytest.raises(wsi.SlideOpenError, match="empty"):
        wsi.open_slide(zero_byte_slide)


def test_missing_resolution_is_an_error_unless_overridden(no_mpp_tiff: Path) -> None:
    with wsi.open_slide(no_mpp_tiff) as slide:
        assert slide.metadata_mpp is None or not all(0.05 < m < 20 for m in slide.metadata_mpp)
        with pytest.raises(wsi.MissingResolutionError, match="--mpp"):
            _ = slide.mpp
    with wsi.open_slide(no_mpp_tiff, mpp=0.5) as slide:
        assert slide.mpp == (0.5, 0.5) and slide.mpp_source == "override"
    with pytest.raises(wsi.ImplausibleResolutionError):
        wsi.open_slide(no_mpp_tiff, mpp=300.0)


def test_mpp_override_csv(tmp_path: Path, no_mpp_tiff: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{no_mpp_tiff.name},0.25\nother,0.5\n")
    overrides = wsi.load_mpp_overrides(table)
    assert wsi.lookup_mpp_override(overrides, no_mpp_tiff) == 0.25
    assert wsi.lookup_mpp_override(overrides, tmp_path / "other.svs") == 0.5
    assert wsi.lookup_mpp_override(overrides, tmp_path / "unknown.svs") is None
    table.write_text("slide,mpp\nx,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        wsi.load_mpp_overrides(table)


def _drop_file_permission_override() -> None:
    """Run in the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so even root meets the permission bits (as any hospital service user does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def test_unreadable_file_is_a_clear_error(tmp_path: Path, small_svs: Path) -> None:
    target = tmp_path / "locked.svs"
    target.write_bytes(small_svs.read_bytes())
    target.chmod(0)
    code = ("import wsi, sys\n"
            "try:\n    wsi.open_slide(sys.argv[1])\n"
            "except wsi.SlideOpenError as e:\n    print('ERR', e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                            text=True, check=False, preexec_fn=_drop_file_permission_override)
    assert result.returncode == 3, result.stderr
    assert "permission denied" in result.stdout


def test_fsspec_urls_open_with_tiffslide(small_svs: Path) -> None:
    url = small_svs.resolve().as_uri()
    with wsi.open_slide(url) as slide, wsi.open_slide(small_svs) as local:
        assert slide.backend_name == "tiffslide"
        assert slide.dimensions == local.dimensions
        assert slide.content_hash == local.content_hash
        np.testing.assert_array_equal(slide.read_region((512, 512), 0, (64, 64)),
                                      local.read_region((512, 512), 0, (64, 64)))
