"""Radiology readers, bags, windowing and de-identification on real DICOM and NIfTI files
(pydicom's test files, the pydicom-data package, nibabel's test data), checked against
pydicom and nibabel directly. Bad inputs are made by modifying copies of real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array

from pipelines.radiology import (
    RadiologyConfig,
    StudyKeys,
    build_bag,
    deidentify,
    discover_studies,
    extract_studies,
    find_dicom_studies,
    read_dicom_study,
    read_nifti,
)
from pipelines.radiology.config import ImageBagSettings, VolumeBagSettings
from pipelines.radiology.errors import (
    DeidentificationError,
    InconsistentGeometryError,
    MissingSliceError,
    NoPixelDataError,
    NotDicomError,
)
from pipelines.radiology.windowing import PRESETS, to_uint8

KEYS = StudyKeys(bytes(range(32)))
ANATOMICAL = Path(data_path) / "anatomical.nii"
TINY_ALPHA = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/TINY_ALPHA"


def real(name: str) -> Path:
    """A real test file of pydicom or pydicom-data."""
    return Path(get_testdata_file(name))


def read(path: Path, spacing: float | None = None):
    studies = find_dicom_studies([path])
    assert len(studies) == 1
    return read_dicom_study(studies[0], KEYS, spacing)


def write_series(folder: Path, count: int, step_mm: float = 5.0, order: list[int] | None = None
                 ) -> list[Path]:
    """Copies of the real CT_small slice at ``step_mm`` along its normal, pixel values
    shifted by the slice number, written to disk in shuffled ``order``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(real("CT_small.dcm"))
    series_uid = pydicom.uid.generate_uid(entropy_srcs=["series", str(folder)])
    paths = []
    for slot, k in enumerate(order or list(range(count))):
        ds = pydicom.dcmread(real("CT_small.dcm"))
        ds.ImagePositionPatient = [*base.ImagePositionPatient[:2],
                                   round(float(base.ImagePositionPatient[2]) + k * step_mm, 4)]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(folder), str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        raw = pixel_array(ds)
        ds.PixelData = (raw + 10 * k).astype(raw.dtype).tobytes()
        path = folder / f"file{slot:02d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_ct_small_hounsfield_units_and_geometry() -> None:
    ds = pydicom.dcmread(real("CT_small.dcm"))
    volume = read(real("CT_small.dcm"))
    assert volume.modality == "CT" and volume.kind == "volume" and volume.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.array[0], apply_modality_lut(pixel_array(ds), ds))
    assert volume.array.min() < -800  # lung air in HU after the -1024 intercept
    assert volume.spacing == (float(ds.SliceThickness), *map(float, ds.PixelSpacing))
    lps_origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(volume.affine[:3, 3], lps_origin * [-1, -1, 1])
    col_step = np.asarray(ds.ImageOrientationPatient[:3], float) * float(ds.PixelSpacing[1])
    np.testing.assert_allclose(volume.affine[:3, 0], col_step * [-1, -1, 1])
    assert volume.study_id.startswith("study-") and "CompressedSamples" not in repr(volume)


def test_mr_small_values_and_file_window_match_pydicom() -> None:
    ds = pydicom.dcmread(real("MR_small.dcm"))
    volume = read(real("MR_small.dcm"))
    np.testing.assert_array_equal(volume.array[0], pixel_array(ds).astype(np.float32))
    assert volume.window == (float(ds.WindowCenter), float(ds.WindowWidth))
    low, high = -(2.0**15), 2.0**15 - 1  # pydicom's output range for signed 16 bits
    expected = (apply_voi_lut(pixel_array(ds), ds) - low) / (high - low) * 255
    assert np.abs(to_uint8(volume, volume.array[0], "file") - expected).max() <= 1.0


@pytest.mark.parametrize(("compressed", "reference", "spacing"), [
    ("693_J2KR.dcm", "693_UNCR.dcm", None),                         # CT head, JPEG 2000
    ("MR_small_RLE.dcm", "MR_small.dcm", None),                     # RLE
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", None),        # JPEG-LS
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", None),            # JPEG 2000
    ("emri_small_RLE.dcm", "emri_small.dcm", 1.0),                  # multi-frame RLE
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", 1.0),     # multi-frame JPEG-LS
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm", 0.2),                          # CR chest, JPEG 2000
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0.2),                          # US RGB, JPEG 2000
    ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_2frame.dcm", None),       # US palette cine, RLE
])
def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_file(
        compressed: str, reference: str, spacing: float | None) -> None:
    packed, plain = read(real(compressed), spacing), read(real(reference), spacing)
    assert packed.shape == plain.shape and packed.array.dtype == plain.array.dtype
    np.testing.assert_array_equal(packed.array, plain.array)


def test_jpeg_baseline_cine_ultrasound_is_rgb() -> None:
    ds = pydicom.dcmread(real("examples_ybr_color.dcm"))
    volume = read(real("examples_ybr_color.dcm"))
    assert volume.kind == "image" and volume.is_color
    assert volume.array.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns, 3)
    region = ds.SequenceOfUltrasoundRegions[0]
    assert volume.spacing[2] == pytest.approx(float(region.PhysicalDeltaX) * 10)
    np.testing.assert_array_equal(volume.array, pixel_array(ds))


def test_enhanced_multiframe_ct_uses_per_frame_geometry() -> None:
    ds = pydicom.dcmread(real("eCT_Supplemental.dcm"))
    volume = read(real("eCT_Supplemental.dcm"))
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient
                          for f in ds.PerFrameFunctionalGroupsSequence], dtype=float)
    shared = ds.SharedFunctionalGroupsSequence[0]
    normal = np.cross(*np.reshape(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                                  (2, 3)).astype(float))
    first = int(np.argmin(positions @ normal))
    np.testing.assert_allclose(volume.affine[:3, 3], positions[first] * [-1, -1, 1])
    assert volume.spacing[0] == pytest.approx(float(np.ptp(positions @ normal)))
    raw = pixel_array(ds)[np.argsort(positions @ normal)]
    np.testing.assert_array_equal(volume.array, raw.astype(np.float32) - 1024.0)  # per-frame HU


def test_monochrome1_radiograph_is_inverted() -> None:
    ds = pydicom.dcmread(real("RG1_UNCR.dcm"))
    volume = read(real("RG1_UNCR.dcm"), spacing=0.2)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and volume.modality == "CR"
    np.testing.assert_array_equal(volume.array[0], (2**ds.BitsStored - 1) - pixel_array(ds))
    assert volume.window == (2**ds.BitsStored - 1 - float(ds.WindowCenter),
                             float(ds.WindowWidth))


def test_voi_lut_sequence_matches_pydicom() -> None:
    ds = pydicom.dcmread(real("vlut_04.dcm"))
    volume = read(real("vlut_04.dcm"), spacing=1.0)
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    expected = np.round(apply_voi_lut(pixel_array(ds), ds) / (2**bits - 1) * 255)
    np.testing.assert_array_equal(to_uint8(volume, volume.array[0], "file"), expected)


def test_ct_presets_follow_dicom_linear_windowing() -> None:
    ds = pydicom.dcmread(real("693_UNCR.dcm"))
    volume = read(real("693_UNCR.dcm"))
    for name, (centre, width) in PRESETS.items():
        ds.WindowCenter, ds.WindowWidth = centre, width
        hu = apply_modality_lut(pixel_array(ds), ds)
        reference = apply_windowing(hu, ds)  # pydicom maps to the rescaled stored range
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low = -(2.0 ** (ds.BitsStored - 1)) * slope + intercept
        high = (2.0 ** (ds.BitsStored - 1) - 1) * slope + intercept
        expected = (reference - low) / (high - low) * 255
        ours = to_uint8(volume, volume.array[0], name).astype(float)
        assert np.abs(ours - expected).max() <= 1.01, name


def test_nifti_is_reoriented_to_ras_with_spacing_kept() -> None:
    image = nib.load(ANATOMICAL)
    assert nib.aff2axcodes(image.affine) != ("R", "A", "S")
    volume = read_nifti(ANATOMICAL, KEYS)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    zooms = image.header.get_zooms()
    assert sorted(volume.spacing) == sorted(map(float, zooms))
    data = image.get_fdata()
    for voxel in [(0, 0, 0), (5, 7, 3), (32, 40, 24)]:  # same world point, same value
        world = image.affine @ [*voxel, 1]
        x, y, z = np.round(np.linalg.inv(volume.affine) @ world)[:3].astype(int)
        assert volume.array[z, y, x] == pytest.approx(data[voxel])
    back, affine = volume.to_source_grid(volume.array)
    np.testing.assert_array_equal(affine, image.affine)
    np.testing.assert_array_equal(back, data.astype(np.float32))


def test_shuffled_series_is_reassembled_in_patient_order(tmp_path: Path) -> None:
    write_series(tmp_path / "series", 6, order=[3, 0, 5, 1, 4, 2])
    base = apply_modality_lut(pixel_array(pydicom.dcmread(real("CT_small.dcm"))),
                              pydicom.dcmread(real("CT_small.dcm")))
    volume = read(tmp_path / "series")
    assert volume.shape == (6, 128, 128) and volume.spacing[0] == pytest.approx(5.0)
    for k in range(6):
        np.testing.assert_array_equal(volume.array[k], base + 10 * k)
    assert np.all(np.diff(volume.slice_centres()[:, 2]) == pytest.approx(5.0))


def test_series_without_positions_falls_back_to_instance_number(tmp_path: Path) -> None:
    for path in write_series(tmp_path / "series", 4, order=[2, 0, 3, 1]):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    volume = read(tmp_path / "series")
    assert not volume.geometry_known
    assert [int(v) for v in volume.array[:, 0, 0] - volume.array[0, 0, 0]] == [0, 10, 20, 30]


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    with pytest.raises(NotDicomError, match=r"notes\.dcm is not a DICOM file"):
        find_dicom_studies([text])
    paths = write_series(tmp_path / "gap", 5)
    paths[2].unlink()
    with pytest.raises(MissingSliceError, match=r"1 slice\(s\) missing between"):
        read(tmp_path / "gap")
    paths = write_series(tmp_path / "spacing", 4)
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[1])
    with pytest.raises(InconsistentGeometryError, match="different pixel spacing"):
        read(tmp_path / "spacing")
    paths = write_series(tmp_path / "orientation", 3)
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(paths[2])
    with pytest.raises(InconsistentGeometryError, match="different orientation"):
        read(tmp_path / "orientation")
    paths = write_series(tmp_path / "uneven", 4)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 2.0]
    ds.save_as(paths[3])
    with pytest.raises(InconsistentGeometryError, match="slice spacing varies"):
        read(tmp_path / "uneven")
    with pytest.raises(NoPixelDataError, match="has no pixel data"):
        read(TINY_ALPHA / "PT000000/ST000000/SE000000/IM000000")


def test_bad_studies_fail_alone_and_the_others_are_extracted(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    shutil.copy(real("CT_small.dcm"), good)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    write_series(tmp_path / "gap", 4)[1].unlink()
    stripped = pydicom.dcmread(real("MR_small.dcm"))
    del stripped.PixelData
    stripped.save_as(tmp_path / "nopixels.dcm")
    studies = discover_studies([good, text, tmp_path / "gap", tmp_path / "nopixels.dcm"])
    config = RadiologyConfig.model_validate({"backbone": {"pretrained": False, "device": "cpu"},
                                             "volume": {"size": 64}})
    results = extract_studies(studies, config, tmp_path / "out", KEYS)
    by_status = {r.status: r for r in results}
    assert [r.status for r in results].count("ok") == 1 and len(results) == 4
    assert (tmp_path / "out" / by_status["ok"].study_id).is_dir()
    errors = " ".join(r.error for r in results if r.status == "failed")
    assert "notes.txt is not a DICOM file" in errors and "missing between" in errors
    assert "has no pixel data" in errors


def test_slice_bag_resamples_and_stacks_neighbours(tmp_path: Path) -> None:
    write_series(tmp_path / "series", 5)
    volume = read(tmp_path / "series")
    settings = VolumeBagSettings(spacing_mm=volume.spacing[1] * 2, size=80, context=1)
    bag = build_bag(volume, settings, ImageBagSettings(), "abdomen")
    assert bag.kind == "slices" and bag.images.shape == (5, 80, 80, 3)
    content = bag.images[2, 8:72, 8:72]  # 128 px at double spacing: 64 px, centred
    assert content.std() > 0 and bag.images[2, :8].max() == 0
    np.testing.assert_array_equal(bag.images[2, ..., 0], bag.images[1, ..., 1])
    np.testing.assert_array_equal(bag.images[0, ..., 0], bag.images[0, ..., 1])  # edge clamps
    assert bag.coords[:, 1].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(bag.geometry[:, 1:], volume.slice_centres())


def test_radiograph_patches_skip_the_background() -> None:
    volume = read(real("RG3_UNCR.dcm"), spacing=0.1)
    settings = ImageBagSettings(spacing_mm=0.4, patch_size=64, min_foreground=0.5)
    bag = build_bag(volume, VolumeBagSettings(), settings, "auto")
    full_grid = (volume.shape[1] * 0.1 // (0.4 * 64)) * (volume.shape[2] * 0.1 // (0.4 * 64))
    assert bag.kind == "patches" and 0 < len(bag) < full_grid
    assert bag.geometry[:, 5].min() >= 0.5
    assert np.all(bag.coords[:, 0] + bag.geometry[:, 3] <= volume.shape[2] + 1)
    assert np.all(bag.coords[:, 1] + bag.geometry[:, 4] <= volume.shape[1] + 1)
    assert bag.geometry[0, 3] == 256  # 64 px at 0.4 mm = 256 source pixels at 0.1 mm


def test_ultrasound_cine_patches_keep_their_frame() -> None:
    volume = read(real("examples_ybr_color.dcm"))
    settings = ImageBagSettings(spacing_mm=1.0, patch_size=32, max_frames=3)
    bag = build_bag(volume, VolumeBagSettings(), settings, "auto")
    assert set(bag.geometry[:, 0].astype(int)) == {0, 14, 29}
    assert len(bag) > 0 and bag.images.dtype == np.uint8


def test_deidentification_basic_profile_with_consistent_uids(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "series", 2)
    originals = [pydicom.dcmread(p) for p in paths]
    cleaned = [deidentify(ds, KEYS, "patient-x") for ds in originals]
    again = deidentify(originals[0], KEYS, "patient-x")
    for ds, clean in zip(originals, cleaned, strict=True):
        assert str(clean.PatientName) == clean.PatientID == "patient-x"
        assert clean.PatientIdentityRemoved == "YES"
        assert not clean.get("PatientBirthDate") and not clean.get("StudyDate")
        assert "OtherPatientIDsSequence" not in clean and "InstitutionName" not in clean
        assert not any(element.tag.is_private for element in clean)
        assert clean.SOPClassUID == ds.SOPClassUID
        assert clean.SOPInstanceUID != ds.SOPInstanceUID
        assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
        np.testing.assert_array_equal(pixel_array(clean), pixel_array(ds))
        text = str(clean)
        assert "CompressedSamples" not in text and ds.StudyInstanceUID not in text
    assert cleaned[0].StudyInstanceUID == cleaned[1].StudyInstanceUID == again.StudyInstanceUID
    assert cleaned[0].SOPInstanceUID == again.SOPInstanceUID != cleaned[1].SOPInstanceUID
    assert len(cleaned[0].StudyInstanceUID) <= 64
    assert str(originals[0].PatientName) == "CompressedSamples^CT1"  # input left untouched
    burned = originals[0].copy()
    burned.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="burned-in"):
        deidentify(burned, KEYS, "patient-x")
