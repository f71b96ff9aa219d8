"""Exchange with CLAM/TRIDENT-style files: HDF5 and ``.pt`` exports, HDF5 import.

Exports are written under a temporary name in the destination folder, flushed, and renamed,
so a half-written export never appears under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi.fingerprint import file_sha256

from ._layout import SCHEMA, fsync_path, to_jsonable, utc_now
from .errors import FeatureStoreError
from .reader import FeatureStore, open_features
from .writer import FeatureStoreWriter

# coords attributes CLAM and TRIDENT loaders read, copied from attrs['grid'] when present
GRID_COORD_ATTRIBUTES = ("patch_size", "patch_size_level0", "patch_level", "target_mpp",
                         "level0_mpp", "downsample", "level_dim", "level0_magnification",
                         "target_magnification", "overlap", "name")


def _write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, flush ``tmp`` to disk, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fsync_path(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _coord_attributes(store: FeatureStore) -> dict[str, Any]:
    grid = store.attrs.get("grid")
    sources = [grid if isinstance(grid, dict) else {}, store.attrs]
    found: dict[str, Any] = {}
    for name in GRID_COORD_ATTRIBUTES:
        for source in sources:
            value = source.get(name)
            if value is not None and not isinstance(value, dict):
                found[name] = value
                break
    return found


def export_hdf5(store: FeatureStore, path: str | Path) -> Path:
    """Write ``features`` (N, D) float32 and ``coords`` (N, 2) int64 to an HDF5 file.

    ``coords`` carries ``patch_size``, ``patch_size_level0``, ``patch_level``, ``target_mpp``,
    ``level0_mpp`` (and other grid fields when known), as CLAM/TRIDENT loaders expect; the
    file's root attributes hold the store's schema, key and provenance (JSON).
    """
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            features = handle.create_dataset("features", shape=(len(store), store.feature_dim),
                                             dtype="float32")
            for rows, block in store.iter_chunks(np.float32):
                features[rows] = block
            coords = handle.create_dataset("coords", data=store.coords)
            coords.attrs.update(_coord_attributes(store))
            handle.attrs["slidepipe_schema"] = SCHEMA
            handle.attrs["key"] = store.key
            handle.attrs["provenance"] = json.dumps(store.attrs, default=str)

    return _write_atomic(path, write)


def export_pt(store: FeatureStore, path: str | Path) -> Path:
    """``torch.save`` the (N, D) float32 feature tensor, as CLAM's trainer loads ``pt_files``."""
    import torch  # deferred: the store itself (and its writer processes) never need torch

    tensor = torch.from_numpy(np.ascontiguousarray(store.features(dtype=np.float32)))
    return _write_atomic(path, lambda tmp: torch.save(tensor, tmp))


def _squeezed(dataset: h5py.Dataset, width: int | None, name: str, source: Path) -> h5py.Dataset:
    """Check ``dataset`` is (N, W) or (1, N, W); return a handle indexable as (N, W)."""
    shape = dataset.shape
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or (width is not None and shape[1] != width):
        raise FeatureStoreError(f"{source}: dataset {name!r} has shape {dataset.shape}; expected "
                                f"(N, {width or 'D'}) or (1, N, {width or 'D'})")
    return dataset


def _rows(dataset: h5py.Dataset, rows: slice) -> np.ndarray:
    return np.asarray(dataset[0, rows] if dataset.ndim == 3 else dataset[rows])


def _integral_coords(raw: np.ndarray, source: Path) -> np.ndarray:
    coords = np.asarray(raw).reshape(-1, 2)
    if coords.size and not np.issubdtype(coords.dtype, np.integer):
        rounded = np.rint(coords)
        if not np.array_equal(rounded, coords):
            raise FeatureStoreError(f"{source}: coords are not whole level-0 pixels")
        coords = rounded
    return coords.astype(np.int64)


def import_h5(h5_path: str | Path, store_path: str | Path, *, backbone: str,
              attributes: dict[str, Any] | None = None) -> FeatureStore:
    """Bring a CLAM/TRIDENT feature file into a complete store and return it.

    Reads ``features`` ([N, D] or [1, N, D]) and ``coords`` ([N, 2] or [1, N, 2]) chunk by
    chunk; keeps float16 sources as float16, stores anything else as float32. The key is the
    hash of the source file's content and ``backbone``, so importing the same file again
    reuses the store. Provenance says ``imported from <path>``; the coords attributes are kept
    under ``grid``; ``attributes`` are added on top.
    """
    source = Path(h5_path)
    source_hash = file_sha256(source)
    key = hashlib.sha256(f"import|{source_hash}|{backbone}".encode()).hexdigest()
    with h5py.File(source, "r") as handle:
        for name in ("features", "coords"):
            if name not in handle:
                raise FeatureStoreError(f"{source}: no {name!r} dataset; not a CLAM/TRIDENT "
                                        "feature file")
        features = _squeezed(handle["features"], None, "features", source)
        coords_ds = _squeezed(handle["coords"], 2, "coords", source)
        coords = _integral_coords(coords_ds[()], source)
        num, dim = features.shape[-2:]
        if num != len(coords):
            raise FeatureStoreError(f"{source}: {num} feature rows but {len(coords)} coords")
        dtype = "float16" if features.dtype == np.float16 else "float32"
        grid = to_jsonable({k: v for k, v in coords_ds.attrs.items()}, "coords.attrs")
        merged: dict[str, Any] = {
            "provenance": f"imported from {source.resolve()}", "source_file": str(source),
            "source_sha256": source_hash, "backbone": backbone, "grid": grid,
            "imported": utc_now(),
        }
        merged.update(attributes or {})
        writer = FeatureStoreWriter.open(store_path, key=key, coords=coords, feature_dim=dim,
                                         dtype=dtype, attributes=merged)
        for index in writer.pending_chunks():
            writer.write_chunk(index, _rows(features, writer.chunk_slice(index)))
        writer.finalize()
    return open_features(store_path)
