"""What Dask workers do to extract a radiology study's features, in two tasks:

* :func:`prepare_study` (any worker): read the study, build its bag of instances and, unless
  its store is already complete with the same key, hand the bag to the model task through a
  file in the study's output folder (``bag.npz``; every worker sees the output folder);
* :func:`embed_study` (a model worker): embed the bag with the per-process cached backbone
  (as slide chunks are), write the complete feature store and remove the hand-off file.

A store is keyed by the study's pixel content, geometry, bag settings, backbone and dtype
(:func:`study_key`); its ``grid`` attribute holds ``target_mpp`` (the bag's spacing in µm/px)
and ``patch_size``, which MIL compares between training and prediction; ``radiology`` holds the
study's geometry (no PHI), and the ``geometry`` array one row per instance.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi.atomic import write_bytes_atomic

from .. import __version__
from ..extract_worker import BackboneIdentity, cached_embedder, store_path
from ..feature_store import FeatureStoreWriter, store_status
from .bags import Bag, build_bag
from .config import RadiologyConfig
from .keys import StudyKeys
from .studies import StudyInput, read_study
from .volume import Volume

SCHEMA = "slidepipe.radiology/1"
GEOMETRY = "geometry"
BAG_NAME = "bag.npz"


@dataclass(frozen=True)
class StudyJob:
    """One study to read and turn into a bag (small and picklable)."""

    study: StudyInput
    config: RadiologyConfig
    keys: StudyKeys
    out: str
    backbone: BackboneIdentity
    overwrite: bool = False


@dataclass(frozen=True)
class PreparedStudy:
    """A study read and bagged. ``bag_file`` is empty when there is nothing to embed: the bag
    is empty (no foreground) or the store is complete with this key (``cached``)."""

    study_id: str
    modality: str
    kind: str
    instances: int
    store: str
    key: str
    cached: bool = False
    bag_file: str = ""
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True)
class EmbedJob:
    """A bag on disk to embed into the store ``store``."""

    bag_file: str
    store: str
    key: str
    attributes: dict[str, Any]
    backbone: dict[str, Any]
    torch_threads: int
    chunk_rows: int
    dtype: str
    overwrite: bool


def _bag_settings(volume: Volume, config: RadiologyConfig) -> dict[str, Any]:
    section = config.volume if volume.kind == "volume" else config.image
    return {"kind": volume.kind, "window": config.window, **section.model_dump(mode="json")}


def study_key(volume: Volume, backbone: BackboneIdentity, config: RadiologyConfig) -> str:
    """Identity of a study's features: content, geometry, bag settings, backbone, dtype."""
    parts = {"schema": SCHEMA, "content": volume.content_hash, "modality": volume.modality,
             "spacing": list(volume.spacing), "bag": _bag_settings(volume, config),
             "backbone": backbone.name, "weights": backbone.weights_hash,
             "dtype": config.dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _attributes(volume: Volume, bag: Bag, backbone: BackboneIdentity,
                config: RadiologyConfig) -> dict[str, Any]:
    return {
        "slide_id": volume.study_id, "slide_hash": volume.content_hash,
        "backbone": backbone.name, "backbone_source": backbone.source,
        "weights_hash": backbone.weights_hash, "pretrained": config.backbone.pretrained,
        "feature_dim": backbone.feature_dim,
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


def _save_bag(path: Path, bag: Bag) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=bag.images, coords=bag.coords, geometry=bag.geometry,
             columns=np.asarray(bag.columns))
    write_bytes_atomic(path, buffer.getvalue())


def prepare_study(job: StudyJob) -> PreparedStudy:
    """Read the study and build its bag (raises a RadiologyError when it cannot); write the
    bag for :func:`embed_study` unless it is empty or its store is complete."""
    config = job.config
    volume = read_study(job.study, config, job.keys)
    bag = build_bag(volume, config.volume, config.image, config.window)
    store = store_path(job.out, volume.study_id, job.backbone.name)
    prepared = PreparedStudy(study_id=volume.study_id, modality=volume.modality,
                             kind=volume.kind, instances=len(bag), store=str(store),
                             key=study_key(volume, job.backbone, config))
    if not len(bag):
        return prepared
    if not job.overwrite and store_status(store, prepared.key) == "complete":
        return replace(prepared, cached=True)
    bag_file = Path(job.out) / volume.study_id / BAG_NAME
    bag_file.parent.mkdir(parents=True, exist_ok=True)
    _save_bag(bag_file, bag)
    return replace(prepared, bag_file=str(bag_file),
                   attributes=_attributes(volume, bag, job.backbone, config))


def write_store(path: Path, key: str, coords: np.ndarray, geometry: np.ndarray,
                columns: list[str], features: np.ndarray, attributes: dict[str, Any],
                chunk_rows: int, dtype: str, overwrite: bool = False) -> None:
    """Write ``features`` and the bag's geometry into a complete feature store at ``path``."""
    writer = FeatureStoreWriter.open(path, key=key, coords=coords,
                                     feature_dim=features.shape[1], chunk_rows=chunk_rows,
                                     dtype=dtype, attributes=attributes, overwrite=overwrite)
    group = zarr.open_group(path, mode="a", zarr_format=3)
    array = group.create_array(GEOMETRY, data=geometry, overwrite=True)
    array.attrs["columns"] = columns
    for index in writer.pending_chunks():
        writer.write_chunk(index, features[writer.chunk_slice(index)])
    writer.finalize()


def embed_study(job: EmbedJob) -> int:
    """Embed the bag, write the complete store and remove the bag file; returns the number of
    instances (runs on a model worker)."""
    with np.load(job.bag_file, allow_pickle=False) as bag:
        images, coords, geometry = bag["images"], bag["coords"], bag["geometry"]
        columns = [str(c) for c in bag["columns"]]
    features = cached_embedder(job.backbone, job.torch_threads)(images)
    write_store(Path(job.store), job.key, coords, geometry, columns, features,
                job.attributes, job.chunk_rows, job.dtype, job.overwrite)
    Path(job.bag_file).unlink(missing_ok=True)
    return len(images)
