"""Errors of the radiology adapters: each names the input and says what to do about it.

Every error is a :class:`RadiologyError`, so a batch can record one study's failure and go on
with the others. Messages never quote patient identifiers (names, IDs, UIDs, dates): only file
names, tag keywords and numbers.
"""

from __future__ import annotations


class RadiologyError(Exception):
    """A study cannot be read, assembled or exported; the message names the file and the fix."""


class NotDicomError(RadiologyError):
    """A file given as DICOM is not a DICOM file."""


class NotVolumeFileError(RadiologyError):
    """A file is neither DICOM nor a format nibabel reads."""


class NoPixelDataError(RadiologyError):
    """A DICOM instance has no pixel data (e.g. a structured report or a DICOMDIR record)."""


class DecodeError(RadiologyError):
    """The pixel data of a DICOM instance cannot be decoded (missing codec, truncated data)."""


class MissingSliceError(RadiologyError):
    """A series has a gap where a slice should be."""


class InconsistentGeometryError(RadiologyError):
    """Slices of a series disagree on orientation, pixel spacing, size or slice spacing."""


class MissingSpacingError(RadiologyError):
    """An image has no usable pixel spacing and none was given."""


class DeidentificationError(RadiologyError):
    """A DICOM object cannot be de-identified safely (e.g. burned-in annotation)."""
