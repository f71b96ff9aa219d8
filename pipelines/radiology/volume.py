"""The value every reader returns: a :class:`Volume` of pixels with its geometry and no PHI.

Conventions (shared by the readers, the bags and the exports):

- ``array`` is ``(Z, Y, X)`` float32 for greyscale (Hounsfield units for CT, modality values
  otherwise, brighter = higher: MONOCHROME1 is inverted) or ``(Z, Y, X, 3)`` uint8 for colour.
  ``Z`` runs over slices (volumes, in patient order along the slice normal) or frames (2D
  images, cine loops).
- ``spacing`` is ``(slice, row, column)`` in mm; ``affine`` maps voxel indices ``(x, y, z)``
  = ``(column, row, slice)`` to RAS+ millimetres (the NIfTI convention; DICOM's LPS is
  converted), so ``array.transpose(2, 1, 0)`` with ``affine`` is a valid NIfTI image.
- ``study_id`` is a keyed-hash pseudonym; nothing identifying the patient is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["volume", "image"]
"""``volume``: cross-sectional slices (CT, MR, NIfTI); ``image``: 2D images or cine frames."""

VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})


@dataclass(frozen=True)
class VoiLut:
    """A VOI LUT from the file (``VOILUTSequence``), applied to modality values.

    ``mirror`` is set for MONOCHROME1 images, whose stored values were inverted to
    ``mirror - value``: the table is then looked up at the original value and its output
    inverted, so the displayed image is the one the file specifies, brighter = higher.
    """

    first_mapped: int
    table: np.ndarray
    bits: int
    mirror: float | None = None

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Display values in [0, 1] for ``values`` (modality values as stored in the Volume)."""
        original = values if self.mirror is None else self.mirror - values
        index = np.clip(np.round(original - self.first_mapped), 0, len(self.table) - 1)
        out = self.table[index.astype(np.int64)].astype(np.float32) / float(2**self.bits - 1)
        return 1.0 - out if self.mirror is not None else out


@dataclass(frozen=True)
class Volume:
    """Pixels of one study (a series, an image or a NIfTI file) with geometry, without PHI."""

    study_id: str
    modality: str
    kind: Kind
    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    content_hash: str
    source_format: Literal["dicom", "nifti"]
    geometry_known: bool = True
    window: tuple[float, float] | None = None
    """(centre, width) from the file, in the units of ``array``."""
    voi_lut: VoiLut | None = None
    source_affine: np.ndarray | None = None
    """Affine of the input file's own voxel grid (NIfTI inputs; None: same as ``affine``)."""
    to_source: np.ndarray | None = field(default=None, repr=False)
    """nibabel orientation transform from this RAS grid back to the input's grid."""

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4) or (self.array.ndim == 4 and self.array.shape[3] != 3):
            raise ValueError(f"array must be (Z, Y, X) or (Z, Y, X, 3), got {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def is_color(self) -> bool:
        """Whether the pixels are RGB."""
        return self.array.ndim == 4

    @property
    def num_slices(self) -> int:
        """Slices (volumes) or frames (images)."""
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        z, y, x = self.array.shape[:3]
        return int(z), int(y), int(x)

    def slice_centres(self) -> np.ndarray:
        """(Z, 3) RAS millimetres of the centre of every slice."""
        _, rows, cols = self.shape
        index = np.stack([np.full(self.num_slices, (cols - 1) / 2.0),
                          np.full(self.num_slices, (rows - 1) / 2.0),
                          np.arange(self.num_slices, dtype=np.float64),
                          np.ones(self.num_slices)], axis=1)
        return (index @ self.affine.T)[:, :3]

    def to_source_grid(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``values`` shaped like the grey ``array`` (Z, Y, X), as a NIfTI data array in the
        input's own voxel order, with the affine it needs (the input's affine for NIfTI)."""
        if values.shape != self.shape:
            raise ValueError(f"values must have shape {self.shape}, got {values.shape}")
        data = np.asarray(values).transpose(2, 1, 0)
        if self.to_source is None or self.source_affine is None:
            return data, self.affine.copy()
        from nibabel.orientations import apply_orientation

        return apply_orientation(data, self.to_source), self.source_affine.copy()
