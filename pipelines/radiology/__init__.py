"""Radiology adapters: DICOM and NIfTI studies through the same bag → features → MIL →
heatmap path as the slides.

A study (a DICOM series, a radiograph, an ultrasound image or cine loop, a NIfTI volume) is
read into a :class:`Volume` (:mod:`.dicom`, :mod:`.nifti`), turned into a :class:`Bag` of
instances with geometry (:mod:`.bags`, displayed with :mod:`.windowing`), embedded on Dask
into an ordinary slidepipe feature store (:mod:`.extract`, :mod:`.worker`) that ``slidepipe
train`` / ``predict`` read unchanged, and exported as plots, overlays and an attention
NIfTI (:mod:`.exports`). Studies are named by keyed-hash pseudonyms (:mod:`.keys`); DICOM
written anywhere goes through :mod:`.deid`.
"""

from .bags import Bag, build_bag
from .config import RadiologyConfig, load_radiology_config
from .deid import deidentify, deidentify_file
from .dicom import DicomStudy, find_dicom_studies, read_dicom_study
from .errors import RadiologyError
from .extract import StudyResult, extract_studies
from .keys import StudyKeys
from .nifti import read_nifti
from .studies import StudyInput, discover_studies, read_study
from .volume import Volume

__all__ = [
    "Bag",
    "DicomStudy",
    "RadiologyConfig",
    "RadiologyError",
    "StudyInput",
    "StudyKeys",
    "StudyResult",
    "Volume",
    "build_bag",
    "deidentify",
    "deidentify_file",
    "discover_studies",
    "extract_studies",
    "find_dicom_studies",
    "load_radiology_config",
    "read_dicom_study",
    "read_nifti",
    "read_study",
]
