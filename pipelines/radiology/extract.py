"""Radiology studies → bags → features in ordinary slidepipe feature stores.

Each study found in the inputs (see :func:`discover_studies`) is read, turned into a bag and
embedded with the same backbone registry and :class:`~pipelines.inference.Embedder` as the
slides; its features go to ``OUT/<study_id>/features_<backbone>.zarr`` through the feature
store writer, so ``slidepipe train`` / ``predict`` and :mod:`mil` read them unchanged. The
store's ``grid`` attribute holds ``target_mpp`` (the bag's spacing in µm/px) and
``patch_size``, which MIL compares between training and prediction; ``radiology`` holds the
study's geometry (no PHI), and the ``geometry`` array one row per instance. A study that
fails is recorded and the others go on; a complete store with the same key is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import __version__
from ..backbones import Backbone, load_backbone
from ..extract_worker import store_path
from ..feature_store import FeatureStoreError, FeatureStoreWriter, store_status
from ..inference import Embedder
from .bags import Bag, build_bag
from .config import SLICE_MODALITIES, RadiologyConfig
from .dicom import DicomStudy, find_dicom_studies, read_dicom_study, read_header
from .errors import NotVolumeFileError, RadiologyError
from .keys import StudyKeys
from .nifti import is_nibabel_file, read_nifti
from .volume import Volume

log = logging.getLogger(__name__)

SCHEMA = "slidepipe.radiology/1"
GEOMETRY = "geometry"


@dataclass(frozen=True)
class StudyInput:
    """One study to read: a DICOM study (files grouped) or a nibabel file."""

    label: str
    dicom: DicomStudy | None = None
    nifti: Path | None = None
    error: str | None = None
    """Why the input cannot be a study (e.g. not DICOM); reported as a failed study."""


@dataclass
class StudyResult:
    """One row of the radiology summary (no PHI: the pseudonym, never the input's name)."""

    study_id: str
    modality: str = ""
    kind: str = ""
    status: str = "failed"  # ok, cached, empty, failed
    instances: int = 0
    seconds: float = 0.0
    store: str = ""
    error: str = ""


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


def _bag_settings(volume: Volume, config: RadiologyConfig) -> dict[str, Any]:
    section = config.volume if volume.kind == "volume" else config.image
    return {"kind": volume.kind, "window": config.window, **section.model_dump(mode="json")}


def study_key(volume: Volume, backbone: Backbone, config: RadiologyConfig) -> str:
    """Identity of a study's features: content, geometry, bag settings, backbone, dtype."""
    parts = {"schema": SCHEMA, "content": volume.content_hash, "modality": volume.modality,
             "spacing": list(volume.spacing), "bag": _bag_settings(volume, config),
             "backbone": backbone.spec.name, "weights": backbone.weights_hash,
             "dtype": config.dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _attributes(volume: Volume, bag: Bag, backbone: Backbone,
                config: RadiologyConfig) -> dict[str, Any]:
    return {
        "slide_id": volume.study_id, "slide_hash": volume.content_hash,
        "backbone": backbone.spec.name, "backbone_source": backbone.spec.source,
        "weights_hash": backbone.weights_hash, "pretrained": config.backbone.pretrained,
        "feature_dim": backbone.spec.feature_dim,
        "grid": {"target_mpp": bag.spacing_mm * 1000.0, "patch_size": bag.size,
                 "kind": bag.kind, "spacing_mm": bag.spacing_mm},
        "radiology": {"schema": SCHEMA, "study_id": volume.study_id,
                      "modality": volume.modality, "kind": volume.kind,
                      "source_format": volume.source_format, "shape": list(volume.shape),
                      "spacing_mm": list(volume.spacing), "affine": volume.affine.tolist(),
                      "geometry_known": volume.geometry_known, "color": volume.is_color,
                      "bag": _bag_settings(volume, config), "geometry_columns": list(bag.columns)},
        "config": config.resolved(), "slidepipe_version": __version__,
    }


def write_store(path: Path, key: str, bag: Bag, features: np.ndarray,
                attributes: dict[str, Any], config: RadiologyConfig) -> None:
    """Write ``features`` and the bag's geometry into a complete feature store at ``path``."""
    writer = FeatureStoreWriter.open(path, key=key, coords=bag.coords,
                                     feature_dim=features.shape[1], chunk_rows=config.chunk_rows,
                                     dtype=config.dtype, attributes=attributes)
    group = zarr.open_group(path, mode="a", zarr_format=3)
    geometry = group.create_array(GEOMETRY, data=bag.geometry, overwrite=True)
    geometry.attrs["columns"] = list(bag.columns)
    for index in writer.pending_chunks():
        writer.write_chunk(index, features[writer.chunk_slice(index)])
    writer.finalize()


def extract_studies(studies: list[StudyInput], config: RadiologyConfig, out: Path,
                    keys: StudyKeys, on_study: Callable[[StudyResult], None] | None = None,
                    overwrite: bool = False) -> list[StudyResult]:
    """Extract every study's features into ``out``; never raises for one bad study."""
    backbone = load_backbone(config.backbone)
    embedder = Embedder(backbone)
    results = []
    for study in studies:
        started = time.perf_counter()
        result = StudyResult(study_id="")
        try:
            volume = read_study(study, config, keys)
            result.study_id, result.modality = volume.study_id, volume.modality
            result.kind = volume.kind
            bag = build_bag(volume, config.volume, config.image, config.window)
            result.instances = len(bag)
            path = store_path(out, volume.study_id, backbone.spec.name)
            key = study_key(volume, backbone, config)
            result.store = str(path)
            if not len(bag):
                result.status, result.error = "empty", "no foreground patch in the image"
            elif not overwrite and store_status(path, key) == "complete":
                result.status = "cached"
            else:
                features = embedder(bag.images)
                write_store(path, key, bag, features,
                            _attributes(volume, bag, backbone, config), config)
                result.status = "ok"
        except (RadiologyError, FeatureStoreError, ValueError, OSError) as error:
            log.warning("%s: %s", study.label, error, exc_info=True)
            result.error = f"{study.label}: {error}"
        result.seconds = round(time.perf_counter() - started, 3)
        results.append(result)
        if on_study is not None:
            on_study(result)
    return results
