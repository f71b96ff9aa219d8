"""DICOM studies with pydicom: series discovery and assembly, pixel decoding, HU, display.

- **Discovery** (:func:`find_dicom_studies`): folders are searched recursively; instances of
  cross-sectional modalities (CT, MR, PT, NM) are grouped by SeriesInstanceUID into one study,
  every other instance (CR, DX, US, …) is a study of its own. Files in folders that are not
  DICOM are skipped; a file named explicitly that is not DICOM is an error.
- **Assembly** (:func:`read_dicom_study`): single-frame slices are ordered by
  ImagePositionPatient projected on the slice normal (InstanceNumber when positions are
  missing) and checked: one orientation, one pixel spacing and size, no duplicate positions,
  uniform slice spacing (a gap of whole steps is reported as missing slices). Multi-frame
  files use their per-frame functional groups (enhanced CT/MR) or their top-level geometry.
- **Pixels**: decoded by pydicom and its plugins (JPEG, JPEG 2000, JPEG-LS, RLE through
  pylibjpeg); modality LUT / rescale slope and intercept applied (HU for CT); MONOCHROME1
  inverted so that brighter is higher; window centre/width and VOI LUT kept for display;
  YBR and palette colour converted to RGB uint8.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from .errors import (
    DecodeError,
    InconsistentGeometryError,
    MissingSliceError,
    MissingSpacingError,
    NoPixelDataError,
    NotDicomError,
)
from .keys import StudyKeys
from .volume import VOLUME_MODALITIES, VoiLut, Volume

log = logging.getLogger(__name__)

#: Relative tolerance of slice-spacing uniformity (5 %, plus 0.01 mm of rounding).
SPACING_TOLERANCE = 0.05
ORIENTATION_TOLERANCE = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomStudy:
    """The files of one study as found on disk (headers only, no pixels read yet)."""

    files: tuple[Path, ...]
    modality: str
    volumetric: bool


def read_header(path: Path) -> Dataset:
    """The header of ``path`` (pixels not read); NotDicomError when it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError) as error:
        raise NotDicomError(f"{path} is not a DICOM file ({type(error).__name__}); "
                            "pass DICOM files, folders of them, or NIfTI files") from error


def _walk(folder: Path) -> Iterable[Path]:
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            yield Path(dirpath) / name


def _study_key(ds: Dataset, path: Path) -> tuple[str, bool]:
    modality = str(ds.get("Modality", "OT")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    volumetric = modality in VOLUME_MODALITIES or (
        "ImagePositionPatient" in ds and frames == 1 and modality not in {"US", "CR", "DX"})
    if volumetric:
        return f"series:{ds.get('SeriesInstanceUID', path.parent)}", True
    return f"instance:{ds.get('SOPInstanceUID', path)}", False


def find_dicom_studies(paths: Iterable[Path]) -> list[DicomStudy]:
    """Group the DICOM files under ``paths`` into studies, in a deterministic order.

    A folder's non-DICOM files (READMEs, DICOMDIR index files) are skipped with a log line; a
    file passed explicitly must be DICOM (NotDicomError otherwise).
    """
    groups: dict[str, list[Path]] = {}
    modalities: dict[str, tuple[str, bool]] = {}
    for path in map(Path, paths):
        candidates = _walk(path) if path.is_dir() else [path]
        for file in candidates:
            try:
                ds = read_header(file)
            except NotDicomError:
                if path.is_dir():
                    log.info("skipping %s: not a DICOM file", file)
                    continue
                raise
            if "DirectoryRecordSequence" in ds:
                log.info("skipping %s: a DICOMDIR index, not an image", file)
                continue
            key, volumetric = _study_key(ds, file)
            groups.setdefault(key, []).append(file)
            modalities[key] = (str(ds.get("Modality", "OT")).upper(), volumetric)
    return [DicomStudy(tuple(sorted(files)), *modalities[key])
            for key, files in sorted(groups.items(), key=lambda item: str(item[1][0]))]


def _first(ds: Dataset, keyword: str, *sequences: str) -> Any:
    """``keyword`` from the dataset or from the first item of its functional-group sequences."""
    if keyword in ds:
        return ds[keyword].value
    for name in sequences:
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            items = ds.get(group)
            if items and name in items[0] and keyword in items[0][name][0]:
                return items[0][name][0][keyword].value
    return None


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Pixels as (F, H, W) or (F, H, W, 3): raw stored values for grey, RGB uint8 for colour."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NoPixelDataError(f"{path} has no pixel data (SOP class "
                               f"{ds.get('SOPClassUID', 'unknown')}); it is not an image")
    try:
        # the function, not Dataset.pixel_array: the property fails once a library (wsidicomizer)
        # has switched pydicom to its future behaviour
        pixels = pixel_array(ds)
    except Exception as error:  # pydicom raises many types for codec and data problems
        raise DecodeError(f"{path}: cannot decode its pixel data ({type(error).__name__}: "
                          f"{error}); install the pylibjpeg plugins for compressed transfer "
                          "syntaxes or check that the file is complete") from error
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = apply_color_lut(pixels, ds)
        pixels = (rgb >> 8 if bits > 8 else rgb).astype(np.uint8)
    elif pixels.ndim == (4 if frames > 1 else 3):
        stored = int(ds.get("BitsStored", 8))
        pixels = (pixels >> max(stored - 8, 0)).astype(np.uint8) if stored > 8 else \
            pixels.astype(np.uint8)
    return pixels if frames > 1 else pixels[None]


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", 16))
    if int(ds.get("PixelRepresentation", 0)):
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_values(ds: Dataset, pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Modality values (HU for CT), and the slope and intercept used."""
    slope = _first(ds, "RescaleSlope", "PixelValueTransformationSequence")
    intercept = _first(ds, "RescaleIntercept", "PixelValueTransformationSequence")
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        values = apply_modality_lut(pixels, ds).astype(np.float32)
    else:
        values = pixels.astype(np.float32) * float(slope or 1.0) + float(intercept or 0.0)
    return values, float(slope or 1.0), float(intercept or 0.0)


def _display(ds: Dataset, mirror: float | None) -> tuple[tuple[float, float] | None,
                                                           VoiLut | None]:
    """The file's window (centre, width) and VOI LUT, mirrored for MONOCHROME1."""
    voi_lut = None
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        first, bits = int(item.LUTDescriptor[1]), int(item.LUTDescriptor[2])
        voi_lut = VoiLut(first, np.asarray(item.LUTData, dtype=np.int64), bits, mirror)
    centre = _first(ds, "WindowCenter", "FrameVOILUTSequence")
    width = _first(ds, "WindowWidth", "FrameVOILUTSequence")
    window = None
    if centre is not None and width is not None:
        centre = float(centre[0] if isinstance(centre, list | pydicom.multival.MultiValue)
                       else centre)
        width = float(width[0] if isinstance(width, list | pydicom.multival.MultiValue)
                      else width)
        window = (mirror - centre if mirror is not None else centre, width)
    return window, voi_lut


def _grey(ds: Dataset, pixels: np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None,
                                                    VoiLut | None]:
    values, slope, intercept = _modality_values(ds, pixels)
    mirror = None
    if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
        low, high = (v * slope + intercept for v in _stored_range(ds))
        mirror = low + high
        values = mirror - values
    window, voi_lut = _display(ds, mirror)
    return values, window, voi_lut


def _orientation(ds: Dataset) -> np.ndarray | None:
    value = _first(ds, "ImageOrientationPatient", "PlaneOrientationSequence")
    return None if value is None else np.asarray(value, dtype=np.float64)


def _pixel_spacing(ds: Dataset, path: Path, override: float | None) -> tuple[float, float]:
    """(row, column) spacing in mm: PixelSpacing, ImagerPixelSpacing (corrected for the
    estimated magnification), or the first ultrasound region calibrated in cm."""
    if override is not None:
        return override, override
    spacing = _first(ds, "PixelSpacing", "PixelMeasuresSequence")
    if spacing is not None and min(map(float, spacing)) > 0:
        return float(spacing[0]), float(spacing[1])
    imager = ds.get("ImagerPixelSpacing")
    if imager is not None and min(map(float, imager)) > 0:
        factor = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
        return float(imager[0]) / factor, float(imager[1]) / factor
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        if region.get("PhysicalUnitsXDirection") == 3 and region.get(
                "PhysicalUnitsYDirection") == 3:  # 3: centimetres
            return float(region.PhysicalDeltaY) * 10.0, float(region.PhysicalDeltaX) * 10.0
    raise MissingSpacingError(f"{path} has no usable pixel spacing (PixelSpacing, "
                              "ImagerPixelSpacing or a calibrated ultrasound region); give one "
                              "with --spacing (mm per pixel) or pixel_spacing_mm in the config")


def _affine(row_dir: np.ndarray, col_dir: np.ndarray, slice_step: np.ndarray,
            origin: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """RAS affine of voxel (column, row, slice) from DICOM LPS geometry."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _order(positions: np.ndarray, normal: np.ndarray, names: list[str]) -> tuple[np.ndarray,
                                                                                  float]:
    """Sort order along ``normal`` and the uniform slice step; raises on gaps and mixes."""
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    if len(order) < 2:
        return order, 0.0
    gaps = np.diff(distance[order])
    if np.any(gaps < 1e-3):
        where = int(np.argmin(gaps))
        raise InconsistentGeometryError(
            f"{names[order[where]]} and {names[order[where + 1]]} lie at the same position; "
            "the folder mixes several acquisitions: split them into separate folders")
    step = float(np.min(gaps))
    for index, gap in enumerate(gaps):
        if abs(gap - step) <= SPACING_TOLERANCE * step + 0.01:
            continue
        ratio = gap / step
        if abs(ratio - round(ratio)) <= SPACING_TOLERANCE:
            raise MissingSliceError(
                f"{round(ratio) - 1} slice(s) missing between {names[order[index]]} and "
                f"{names[order[index + 1]]} ({gap:.3g} mm apart, the series steps by "
                f"{step:.3g} mm); add the missing files or exclude the series")
        raise InconsistentGeometryError(
            f"slice spacing varies in the series of {names[order[0]]} ({step:.3g} mm, then "
            f"{gap:.3g} mm between {names[order[index]]} and {names[order[index + 1]]}); "
            "resample it to uniform spacing first")
    return order, step


def _check_same(values: list[Any], what: str, names: list[str], close: bool = False) -> None:
    for value, name in zip(values[1:], names[1:], strict=True):
        same = (np.allclose(np.asarray(value, float), np.asarray(values[0], float),
                            atol=ORIENTATION_TOLERANCE) if close else value == values[0])
        if not same:
            raise InconsistentGeometryError(
                f"{name} has a different {what} than {names[0]} ({value} vs {values[0]}); "
                "a series must share it: split the folder or fix the files")


def _frame_positions(ds: Dataset) -> np.ndarray | None:
    items = ds.get("PerFrameFunctionalGroupsSequence")
    if not items or "PlanePositionSequence" not in items[0]:
        return None
    return np.array([item.PlanePositionSequence[0].ImagePositionPatient for item in items],
                    dtype=np.float64)


def _content_hash(arrays: Iterable[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def dicom_identity(ds: Dataset, volumetric: bool) -> str:
    """The UIDs a study's pseudonym is made from (series; instance too for 2D images)."""
    parts = [str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))]
    if not volumetric:
        parts.append(str(ds.get("SOPInstanceUID", "")))
    return "/".join(parts)


def read_dicom_study(study: DicomStudy, keys: StudyKeys,
                     spacing_override: float | None = None) -> Volume:
    """Decode and assemble one study into a :class:`Volume` (see the module docstring)."""
    datasets = []
    for path in study.files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, EOFError, ValueError) as error:
            raise NotDicomError(f"{path} is not a readable DICOM file ({error})") from error
    names = [path.name for path in study.files]
    first, path = datasets[0], study.files[0]
    frames = [_decode(ds, p) for ds, p in zip(datasets, study.files, strict=True)]
    color = frames[0].ndim == 4
    _check_same([f.shape[1:] for f in frames], "image size", names)
    if color:
        array = np.concatenate(frames)
        window, voi_lut = None, None
    else:
        greys = [_grey(ds, f) for ds, f in zip(datasets, frames, strict=True)]
        array = np.concatenate([g[0] for g in greys]).astype(np.float32)
        window, voi_lut = greys[0][1], greys[0][2]
    spacing_rc = _pixel_spacing(first, path, spacing_override)
    _check_same([_pixel_spacing(ds, p, spacing_override) for ds, p in
                 zip(datasets, study.files, strict=True)], "pixel spacing", names, close=True)
    orientation = _orientation(first)
    geometry_known = orientation is not None
    if len(datasets) > 1:
        positions = [ds.get("ImagePositionPatient") for ds in datasets]
        orientations = [_orientation(ds) for ds in datasets]
        if all(p is not None for p in positions) and all(o is not None for o in orientations):
            _check_same(orientations, "orientation (ImageOrientationPatient)", names, close=True)
            position_array = np.asarray(positions, dtype=np.float64)
        else:
            geometry_known, position_array = False, None
        frame_names = names
    else:
        position_array = _frame_positions(first)
        if position_array is None and "ImagePositionPatient" in first and len(array) == 1:
            position_array = np.asarray([first.ImagePositionPatient], dtype=np.float64)
        geometry_known = geometry_known and position_array is not None
        frame_names = [f"{path.name} frame {i + 1}" for i in range(len(array))]
    if geometry_known and position_array is not None and orientation is not None:
        row_dir, col_dir = orientation[:3], orientation[3:]
        normal = np.cross(row_dir, col_dir)
        order, step = _order(position_array, normal, frame_names)
        thickness = float(_first(first, "SliceThickness", "PixelMeasuresSequence") or 0.0)
        step = step or float(first.get("SpacingBetweenSlices", 0.0) or thickness or 1.0)
        affine = _affine(row_dir, col_dir, normal * step, position_array[order[0]], spacing_rc)
    else:
        order = _instance_order(datasets, names) if len(datasets) > 1 else np.arange(len(array))
        step = float(first.get("SpacingBetweenSlices", 0.0) or first.get("SliceThickness", 0.0)
                     or 1.0)
        affine = np.diag([-spacing_rc[1], -spacing_rc[0], step, 1.0])
    array = np.ascontiguousarray(array[order])
    return Volume(study_id=keys.study_id(dicom_identity(first, study.volumetric)),
                  modality=study.modality, kind="volume" if study.volumetric else "image",
                  array=array, spacing=(step, spacing_rc[0], spacing_rc[1]), affine=affine,
                  content_hash=_content_hash([array]), source_format="dicom",
                  geometry_known=geometry_known, window=window, voi_lut=voi_lut)


def _instance_order(datasets: list[Dataset], names: list[str]) -> np.ndarray:
    """Order by InstanceNumber (no positions); raises on gaps and duplicates."""
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    if any(n is None for n in numbers):
        raise InconsistentGeometryError(
            f"the series of {names[0]} has neither ImagePositionPatient on every slice nor "
            "InstanceNumber; its slice order cannot be known")
    values = np.asarray([int(n) for n in numbers])
    order = np.argsort(values, kind="stable")
    steps = np.diff(values[order])
    if np.any(steps == 0) or np.any(steps > 1):
        index = int(np.argmax((steps == 0) | (steps > 1)))
        raise MissingSliceError(
            f"InstanceNumbers of the series jump from {values[order[index]]} "
            f"({names[order[index]]}) to {values[order[index + 1]]} "
            f"({names[order[index + 1]]}); a slice is missing or duplicated")
    return order
