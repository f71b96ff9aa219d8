"""NIfTI (and every other format nibabel reads: Analyze, MGH/MGZ, …) as a RAS :class:`Volume`.

The image is reoriented to the closest canonical orientation (RAS+) with nibabel, so axis
order and directions are the same whatever the file's orientation; voxel sizes are kept.
Scaling (``scl_slope``/``scl_inter``) is applied. A 4D file contributes one 3D volume
(``volume_index``, default the first). The reorientation is remembered, so maps computed on
the study (attention) are written back on the input's own grid with the input's affine.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from wsi.fingerprint import file_sha256

from .errors import NotVolumeFileError
from .keys import StudyKeys
from .volume import Volume


def read_nifti(path: Path, keys: StudyKeys, modality: str = "MR",
               volume_index: int = 0) -> Volume:
    """Read ``path`` with nibabel and return the study reoriented to RAS+."""
    path = Path(path)
    try:
        image = nib.load(path)
        affine = np.asarray(image.affine, dtype=np.float64)
    except (ImageFileError, OSError, ValueError, AttributeError) as error:
        raise NotVolumeFileError(f"{path} cannot be read by nibabel ({type(error).__name__}: "
                                 f"{error}); pass NIfTI/MGH/Analyze files or DICOM") from error
    shape = image.shape
    if len(shape) not in (3, 4) or (len(shape) == 4 and not 0 <= volume_index < shape[3]):
        raise NotVolumeFileError(f"{path} has shape {shape}; expected a 3D volume or a 4D "
                                 f"series with a volume {volume_index}")
    if len(shape) == 4:
        image = image.slicer[..., volume_index]
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))
    zooms = canonical.header.get_zooms()[:3]
    ras = axcodes2ornt(("R", "A", "S"))
    content = file_sha256(path)[:32]
    return Volume(study_id=keys.study_id(f"file:{content}"), modality=modality.upper(),
                  kind="volume", array=np.ascontiguousarray(data.transpose(2, 1, 0)),
                  spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
                  affine=np.asarray(canonical.affine, dtype=np.float64),
                  content_hash=content, source_format="nifti", source_affine=affine,
                  to_source=ornt_transform(ras, io_orientation(affine)))
