"""Finding slides and radiology studies in an archive: files, folders (recursive) and manifest
CSVs.

:func:`discover_slides` takes everything as whole slides: a folder holding ``.dcm`` files is one
DICOM-WSI slide. :func:`discover_inputs` tells the two kinds apart (``--modality auto``):
NIfTI-family files (:data:`NIBABEL_SUFFIXES`) and DICOM files that are not whole-slide images
(``.dcm`` files, and suffix-less files with the DICOM preamble) are radiology inputs, while a
folder whose ``.dcm`` files are DICOM-WSI (SOP class VL Whole Slide Microscopy, modality SM)
stays one slide. Explicitly named files are always taken, whatever their extension, so a
mis-named file gets a clear error instead of vanishing.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                  ".svslide", ".btf", ".tf8", ".qptiff")
#: Suffixes of the formats nibabel reads (radiology volumes).
NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr", ".nrrd")
#: ``--modality`` values: ``auto`` tells slides from studies, ``wsi`` takes everything as
#: slides, the others take everything as radiology studies of that modality.
RADIOLOGY_MODALITIES = ("ct", "mr", "cr", "dx", "us")
MODALITIES = ("auto", "wsi", *RADIOLOGY_MODALITIES)
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class ManifestError(ValueError):
    """A manifest CSV is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: where it is, the id its outputs are named by, and an optional
    per-slide µm/px from the manifest."""

    path: Path
    slide_id: str
    mpp: float | None = None


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() or path.suffix else path.name


def is_nibabel_file(path: Path) -> bool:
    """Whether ``path`` has a suffix of a format nibabel reads."""
    return path.name.lower().endswith(NIBABEL_SUFFIXES)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_wsi_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM-WSI instance (False when its header cannot be read)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # not DICOM, truncated…: not a whole slide either way
        return False
    return (str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS
            or str(header.get("Modality", "")).upper() == "SM")


def _is_radiology_file(path: Path) -> bool:
    """A NIfTI-family file, or a DICOM file (``.dcm``, or no suffix and the DICOM preamble)
    that is not a whole-slide image."""
    if is_nibabel_file(path):
        return True
    dicom = path.suffix.lower() == ".dcm" or (not path.suffix and _has_dicom_preamble(path))
    return dicom and not _is_wsi_dicom(path)


@dataclass
class _Found:
    slides: list[Path]
    studies: list[Path]


def _walk(folder: Path, detect: bool, found: _Found) -> None:
    dicom = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if dicom and (not detect or _is_wsi_dicom(dicom[0])):
        found.slides.append(folder)
        return
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            # an MRXS data folder sits beside its index file and is not a slide of its own
            if not child.with_suffix(".mrxs").exists():
                _walk(child, detect, found)
        elif child.name.lower().endswith(SLIDE_SUFFIXES):
            found.slides.append(child)
        elif detect and _is_radiology_file(child):
            found.studies.append(child)


def _read_manifest(path: Path) -> list[tuple[Path, str | None, float | None]]:
    rows: list[tuple[Path, str | None, float | None]] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ManifestError(f"{path}: a manifest needs a 'path' column "
                                "(optional: slide_id, mpp)")
        for line, row in enumerate(reader, start=2):
            slide_path = Path(row["path"].strip())
            if not slide_path.is_absolute():
                slide_path = path.parent / slide_path
            mpp_text = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError as error:
                raise ManifestError(f"{path}, line {line}: mpp {mpp_text!r} is not a number"
                                    ) from error
            rows.append((slide_path, (row.get("slide_id") or "").strip() or None, mpp))
    return rows


def _unique_ids(items: list[tuple[Path, str | None, float | None]]) -> list[SlideEntry]:
    stems = [given or _slide_stem(path) for path, given, _ in items]
    entries = []
    for (path, given, mpp), stem in zip(items, stems, strict=True):
        slide_id = stem
        if given is None and stems.count(stem) > 1:
            slide_id = f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
        entries.append(SlideEntry(path=path, slide_id=slide_id, mpp=mpp))
    ids = [e.slide_id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"slide ids given twice: {', '.join(duplicates)}")
    return entries


@dataclass(frozen=True)
class ArchiveInputs:
    """What :func:`discover_inputs` found: slide entries, and radiology files and folders for
    :func:`pipelines.radiology.discover_studies` (``radiology_modality``: the ``--modality``
    to read them with, ``auto`` unless one was given)."""

    slides: list[SlideEntry]
    studies: list[Path]
    radiology_modality: str = "auto"


def discover_inputs(inputs: list[str | Path], modality: str = "auto") -> ArchiveInputs:
    """Slides and radiology inputs among files, folders and manifest CSVs (see the module
    docstring); ``modality`` ``wsi`` or a radiology modality takes every input as that kind.
    Raises ManifestError for a bad manifest or an unknown modality."""
    if modality not in MODALITIES:
        raise ManifestError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if modality in RADIOLOGY_MODALITIES:
        return ArchiveInputs([], [Path(p) for p in inputs], modality)
    detect = modality == "auto"
    items: list[tuple[Path, str | None, float | None]] = []
    studies: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = _Found([], [])
            _walk(item, detect, found)
            items.extend((p, None, None) for p in found.slides)
            studies.extend(found.studies)
        elif item.suffix.lower() == ".csv":
            items.extend(_read_manifest(item))
        elif detect and item.is_file() and _is_radiology_file(item):
            studies.append(item)
        else:
            items.append((item, None, None))
    seen: set[Path] = set()
    unique = []
    for path, given, mpp in items:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, given, mpp))
    return ArchiveInputs(_unique_ids(unique), studies)


def discover_slides(inputs: list[str | Path]) -> list[SlideEntry]:
    """Expand files, folders and manifest CSVs into slide entries (deduplicated by path),
    taking every input as a whole slide."""
    return discover_inputs(inputs, "wsi").slides
