"""On-disk layout of a feature store and the low-level pieces shared by writer and reader.

::

    SLIDE.features.zarr/             zarr v3 group; attributes: provenance, ``schema``, ``key``
        features/                    (N, D) float16|float32, chunks (chunk_rows, D), zstd
        coords/                      (N, 2) int64 level-0 (x, y), written at creation
        _progress/                   zarr group holding only slidepipe's bookkeeping files
            chunks/00000003.json     completion marker of chunk 3 (sha256 of its bytes)
            COMPLETE.json            written last, after every chunk was re-read and checked

The bookkeeping lives in a sub-group so that listing the root group (``group.keys()``, xarray)
shows only ``features``, ``coords`` and ``_progress``: zarr 3 warns about every plain file or
non-zarr folder it meets directly under a group it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi.atomic import write_json_atomic

from .errors import FeatureStoreError

SCHEMA = "slidepipe.features/1"
MARKER_SCHEMA = "slidepipe.features.chunk/1"
COMPLETE_SCHEMA = "slidepipe.features.complete/1"
FEATURES = "features"
COORDS = "coords"
PROGRESS = "_progress"
MARKERS = "chunks"
COMPLETE = "COMPLETE.json"
DTYPES = ("float16", "float32")
COORD_CHUNK_ROWS = 65536
STALE_PARTIAL_AGE_S = 600.0


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoreLayout:
    """Shape and identity of one store: everything a writer process needs besides its path."""

    key: str
    num_patches: int
    feature_dim: int
    dtype: str
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        """Chunks along N (0 for an empty store)."""
        return -(-self.num_patches // self.chunk_rows)

    def chunk_slice(self, index: int) -> slice:
        """Rows of chunk ``index`` (the last chunk may be shorter)."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range (store has {self.num_chunks} chunks)")
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.num_patches))

    def describe_chunk(self, index: int) -> str:
        """Rows and file of chunk ``index``, for error messages."""
        rows = self.chunk_slice(index)
        return f"rows {rows.start}:{rows.stop}, file {FEATURES}/c/{index}/0"


def chunk_digest(values: np.ndarray, dtype: str) -> str:
    """sha256 of ``values`` cast to the store's little-endian ``dtype`` (C order)."""
    cast = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return hashlib.sha256(cast.tobytes()).hexdigest()


def to_jsonable(value: Any, where: str = "attributes") -> Any:
    """``value`` as plain JSON types (paths, numpy values, dates, enums, pydantic models)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return to_jsonable(value.value, where)
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump(mode="json"), where)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v, where) for v in value]
    raise TypeError(f"{where}: {type(value).__name__} value {value!r} cannot be stored as JSON")


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; a missing path is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def markers_dir(root: Path) -> Path:
    """Folder of the per-chunk completion markers."""
    return root / PROGRESS / MARKERS


def marker_path(root: Path, index: int) -> Path:
    """Completion marker file of chunk ``index``."""
    return markers_dir(root) / f"{index:08d}.json"


def complete_path(root: Path) -> Path:
    """The store's COMPLETE marker file."""
    return root / PROGRESS / COMPLETE


def read_layout(root: Path) -> tuple[dict[str, Any], StoreLayout]:
    """Attributes and layout of the store at ``root``; FeatureStoreError if it is not one."""
    try:
        group = zarr.open_group(root, mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        features = zarr.open_array(root / FEATURES, mode="r", zarr_format=3)
    except Exception as exc:  # any failure to read the metadata means: not a usable store
        raise FeatureStoreError(
            f"{root} is not a readable slidepipe feature store ({type(exc).__name__}: {exc})"
        ) from exc
    if attrs.get("schema") != SCHEMA or not isinstance(attrs.get("key"), str):
        raise FeatureStoreError(
            f"{root} is not a slidepipe feature store (schema {attrs.get('schema')!r}, "
            f"expected {SCHEMA!r})")
    if len(features.shape) != 2 or str(features.dtype) not in DTYPES:
        raise FeatureStoreError(
            f"{root}: features array has shape {features.shape} and dtype {features.dtype}; "
            "expected (N, D) float16/float32")
    layout = StoreLayout(key=attrs["key"], num_patches=int(features.shape[0]),
                         feature_dim=int(features.shape[1]), dtype=str(features.dtype),
                         chunk_rows=int(features.chunks[0]))
    return attrs, layout


def write_marker(root: Path, layout: StoreLayout, index: int, digest: str) -> None:
    """Atomically record that chunk ``index`` is on disk with sha256 ``digest``."""
    rows = layout.chunk_slice(index)
    write_json_atomic(marker_path(root, index), {
        "schema": MARKER_SCHEMA, "key": layout.key, "index": index, "start": rows.start,
        "stop": rows.stop, "dtype": layout.dtype, "feature_dim": layout.feature_dim,
        "sha256": digest, "written": utc_now(), "pid": os.getpid(), "host": socket.gethostname(),
    })


def _marker_digest(path: Path, layout: StoreLayout, index: int) -> str | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = layout.chunk_slice(index)
    expected = {"schema": MARKER_SCHEMA, "key": layout.key, "index": index,
                "start": rows.start, "stop": rows.stop, "dtype": layout.dtype,
                "feature_dim": layout.feature_dim}
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in expected.items()):
        return None
    digest = marker.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def valid_markers(root: Path, layout: StoreLayout) -> dict[int, str]:
    """Chunk index → recorded sha256, for every chunk with a well-formed, matching marker."""
    found: dict[int, str] = {}
    try:
        entries = list(os.scandir(markers_dir(root)))
    except FileNotFoundError:
        return found
    for entry in entries:
        stem, dot, ext = entry.name.partition(".")
        if ext != "json" or not dot or not stem.isdigit():
            continue
        index = int(stem)
        if index < layout.num_chunks:
            digest = _marker_digest(Path(entry.path), layout, index)
            if digest is not None:
                found[index] = digest
    return found


def drop_markers(root: Path, indices: list[int]) -> None:
    """Delete the markers of ``indices`` so that the next run recomputes those chunks."""
    for index in indices:
        marker_path(root, index).unlink(missing_ok=True)


def write_complete(root: Path, layout: StoreLayout, digests: Mapping[int, str]) -> None:
    """Atomically write COMPLETE.json (counts, finish time, digest of all chunk digests)."""
    combined = hashlib.sha256("".join(digests[i] for i in sorted(digests)).encode()).hexdigest()
    write_json_atomic(complete_path(root), {
        "schema": COMPLETE_SCHEMA, "key": layout.key, "num_patches": layout.num_patches,
        "feature_dim": layout.feature_dim, "dtype": layout.dtype,
        "chunk_rows": layout.chunk_rows, "num_chunks": layout.num_chunks,
        "chunks_sha256": combined, "finished": utc_now(),
    })
    fsync_path(complete_path(root).parent)


def read_complete(root: Path, layout: StoreLayout) -> dict[str, Any] | None:
    """The completion record when present and consistent with ``layout``, else None."""
    try:
        record = json.loads(complete_path(root).read_text())
    except (OSError, ValueError):
        return None
    expected = {"schema": COMPLETE_SCHEMA, "key": layout.key,
                "num_patches": layout.num_patches, "feature_dim": layout.feature_dim,
                "dtype": layout.dtype, "chunk_rows": layout.chunk_rows,
                "num_chunks": layout.num_chunks}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
        return None
    return record


def verify_chunks(root: Path, layout: StoreLayout, digests: Mapping[int, str],
                  workers: int = 8) -> dict[int, str]:
    """Re-read each chunk in ``digests`` and compare; returns index → problem for bad ones."""
    features = zarr.open_array(root / FEATURES, mode="r", zarr_format=3)

    def check(index: int) -> tuple[int, str | None]:
        try:
            values = features[layout.chunk_slice(index)]
        except Exception as exc:  # a garbled or truncated chunk fails in the codec pipeline
            return index, (f"{layout.describe_chunk(index)}: cannot be decoded "
                           f"({type(exc).__name__}: {exc})")
        if chunk_digest(values, layout.dtype) != digests[index]:
            return index, f"{layout.describe_chunk(index)}: checksum does not match its marker"
        return index, None

    if not digests:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(digests)))) as pool:
        results = list(pool.map(check, sorted(digests)))
    return {index: problem for index, problem in results if problem is not None}


def sweep_partials(root: Path, min_age_s: float = STALE_PARTIAL_AGE_S) -> int:
    """Delete temporary files left by killed writers inside the store (older than min_age_s).

    Two kinds exist: zarr's own ``c/<i>/0.<uuid>.partial`` chunk files and the
    ``.NAME.partial-*`` files of :mod:`wsi.atomic`. Young ones may belong to a live writer.
    """
    removed = 0
    cutoff = time.time() - min_age_s
    for folder in (root / FEATURES / "c", root / PROGRESS):
        if not folder.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if not (name.endswith(".partial") or ".partial-" in name):
                    continue
                candidate = Path(dirpath) / name
                try:
                    if candidate.stat().st_mtime < cutoff:
                        candidate.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
    return removed
