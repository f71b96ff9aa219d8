"""Finding radiology studies in the inputs and reading one into a :class:`Volume`.

:func:`discover_studies` turns files and folders into :class:`StudyInput` values (NIfTI-family
files by suffix, everything else as DICOM grouped into studies); :func:`read_study` decodes
one, applying ``--modality`` when it is not ``auto``. Both run wherever they are needed: on the
client to plan, on a Dask worker to build a study's bag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi.fingerprint import file_sha256

from ..discovery import is_nibabel_file
from .config import SLICE_MODALITIES, RadiologyConfig
from .dicom import DicomStudy, dicom_identity, find_dicom_studies, read_dicom_study, read_header
from .errors import NotVolumeFileError, RadiologyError
from .keys import StudyKeys
from .nifti import read_nifti
from .volume import Volume


@dataclass(frozen=True)
class StudyInput:
    """One study to read: a DICOM study (files grouped) or a nibabel file."""

    label: str
    dicom: DicomStudy | None = None
    nifti: Path | None = None
    error: str | None = None
    """Why the input cannot be a study (e.g. not DICOM); reported as a failed study."""

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the study is read from (the input itself when it is not a study)."""
        if self.dicom is not None:
            return self.dicom.files
        return (self.nifti if self.nifti is not None else Path(self.label),)


def discover_studies(paths: Iterable[Path]) -> list[StudyInput]:
    """NIfTI-family files by suffix, everything else as DICOM (folders searched recursively).

    An input that is missing or not DICOM becomes a study carrying its error, so that it is
    reported as failed while the others are extracted.
    """
    studies: list[StudyInput] = []
    dicom_paths: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() and is_nibabel_file(path):
            studies.append(StudyInput(label=str(path), nifti=path))
        elif path.is_dir():
            studies += [StudyInput(label=str(p), nifti=p) for p in sorted(path.rglob("*"))
                        if p.is_file() and is_nibabel_file(p)]
            dicom_paths.append(path)
        elif not path.exists():
            studies.append(StudyInput(label=str(path), error=f"{path} does not exist"))
        else:
            try:
                read_header(path)
            except RadiologyError as error:
                studies.append(StudyInput(label=str(path), error=str(error)))
                continue
            dicom_paths.append(path)
    studies += [StudyInput(label=str(s.files[0].parent if len(s.files) > 1 else s.files[0]),
                           dicom=s) for s in find_dicom_studies(dicom_paths)]
    return studies


def read_study(study: StudyInput, config: RadiologyConfig, keys: StudyKeys) -> Volume:
    """The study's :class:`Volume`, with ``--modality`` applied when it is not ``auto``."""
    if study.error is not None:
        raise NotVolumeFileError(study.error)
    if study.nifti is not None:
        modality = "MR" if config.modality == "auto" else config.modality.upper()
        return read_nifti(study.nifti, keys, modality)
    assert study.dicom is not None
    dicom = study.dicom
    if config.modality != "auto":
        dicom = DicomStudy(dicom.files, config.modality.upper(),
                           config.modality in SLICE_MODALITIES)
    return read_dicom_study(dicom, keys, config.image.pixel_spacing_mm)


def study_identity(study: StudyInput) -> str:
    """What the study's pseudonym is made from (``keys.study_id(identity)`` is the id
    :func:`read_study` gives it), without decoding pixels: the first file's UIDs (DICOM) or
    the file's content hash (nibabel). Raises RadiologyError or OSError when unreadable."""
    if study.error is not None:
        raise NotVolumeFileError(study.error)
    if study.nifti is not None:
        return f"file:{file_sha256(study.nifti)[:32]}"
    assert study.dicom is not None
    return dicom_identity(read_header(study.dicom.files[0]), study.dicom.volumetric)
