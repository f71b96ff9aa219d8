"""Writing a feature store: create or resume, one chunk at a time from any process, finalize.

A writer is a small picklable value (its path and layout); every call reopens the store by path,
so Dask workers in other processes or on other hosts can each write their own chunks.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipelines import __version__
from wsi.atomic import atomic_directory

from ._layout import (
    COORD_CHUNK_ROWS,
    COORDS,
    DTYPES,
    FEATURES,
    PROGRESS,
    SCHEMA,
    STALE_PARTIAL_AGE_S,
    StoreLayout,
    chunk_digest,
    complete_path,
    drop_markers,
    fsync_path,
    marker_path,
    markers_dir,
    read_layout,
    sweep_partials,
    to_jsonable,
    utc_now,
    valid_markers,
    verify_chunks,
    write_complete,
    write_marker,
)
from .errors import CorruptStoreError, FeatureStoreError, IncompleteStoreError

logger = logging.getLogger(__name__)

ZSTD_LEVEL = 3
RESERVED_ATTRIBUTES = ("schema", "key", "layout")


def _compressor() -> ZstdCodec:
    # zstd's frame checksum makes most on-disk damage fail loudly at decode time already;
    # the per-chunk sha256 markers catch the rest.
    return ZstdCodec(level=ZSTD_LEVEL, checksum=True)


def _validated_coords(coords: np.ndarray) -> np.ndarray:
    array = np.asarray(coords)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"coords must be integer level-0 pixels, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _store_attributes(attributes: dict[str, Any], layout: StoreLayout) -> dict[str, Any]:
    merged = to_jsonable(dict(attributes))
    ours = {"schema": SCHEMA, "key": layout.key,
            "layout": {"num_patches": layout.num_patches, "feature_dim": layout.feature_dim,
                       "dtype": layout.dtype, "chunk_rows": layout.chunk_rows,
                       "compressor": f"zstd(level={ZSTD_LEVEL}, checksum=true)"}}
    for name in RESERVED_ATTRIBUTES:
        if name in merged and merged[name] != ours[name]:
            raise ValueError(f"attribute {name!r} is set by the feature store; got "
                             f"{merged[name]!r}, expected {ours[name]!r} or nothing")
    merged.update(ours)
    merged.setdefault("created", utc_now())
    merged.setdefault("slidepipe_version", __version__)
    return merged


def _sweep_creation_leftovers(path: Path) -> None:
    """Remove ``.NAME.partial-*`` folders of creations killed long ago (see wsi.atomic)."""
    if not path.parent.is_dir():
        return
    cutoff = time.time() - STALE_PARTIAL_AGE_S
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            continue


def _create(path: Path, layout: StoreLayout, coords: np.ndarray,
            attributes: dict[str, Any]) -> None:
    """Build the store under a temporary name and rename it into place (replacing any)."""
    with atomic_directory(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=attributes)
        group.create_array(FEATURES, shape=(layout.num_patches, layout.feature_dim),
                           chunks=(layout.chunk_rows, layout.feature_dim), dtype=layout.dtype,
                           fill_value=np.nan, compressors=_compressor())
        group.create_array(COORDS, data=coords,
                           chunks=(max(1, min(len(coords), COORD_CHUNK_ROWS)), 2),
                           compressors=_compressor())
        group.create_group(PROGRESS, attributes={
            "description": "slidepipe bookkeeping: per-chunk completion markers and "
                           "COMPLETE.json; not data"})
        markers_dir(tmp).mkdir()
    fsync_path(path.parent)


def _resume_blocker(path: Path, existing: StoreLayout, requested: StoreLayout,
                    coords: np.ndarray) -> str | None:
    """Why the store at ``path`` cannot be resumed for ``requested`` (None: it can)."""
    if existing.key != requested.key:
        return f"key {existing.key!r} differs from {requested.key!r} (stale settings or slide)"
    for field in ("num_patches", "feature_dim", "dtype"):
        if getattr(existing, field) != getattr(requested, field):
            return (f"{field} {getattr(existing, field)!r} differs from "
                    f"{getattr(requested, field)!r}")
    stored = np.asarray(zarr.open_array(path / COORDS, mode="r", zarr_format=3)[:])
    if not np.array_equal(stored.reshape(-1, 2), coords):
        return "coords differ"
    return None


class FeatureStoreWriter:
    """Writes one store chunk by chunk; see :meth:`open`.

    Attributes: ``path``, ``layout`` (key, shape, dtype, chunk rows) and ``num_chunks``.
    """

    def __init__(self, path: Path, layout: StoreLayout) -> None:
        self.path = path
        self.layout = layout
        self.num_chunks = layout.num_chunks

    def __repr__(self) -> str:
        return (f"FeatureStoreWriter({str(self.path)!r}, key={self.layout.key!r}, "
                f"N={self.layout.num_patches}, D={self.layout.feature_dim}, "
                f"{self.layout.dtype}, {self.num_chunks} chunks)")

    @property
    def key(self) -> str:
        """The key (hash of slide content + settings) this writer writes under."""
        return self.layout.key

    @classmethod
    def open(cls, path: str | Path, *, key: str, coords: np.ndarray, feature_dim: int,
             chunk_rows: int = 512, dtype: str = "float16", attributes: dict[str, Any],
             overwrite: bool = False) -> Self:
        """Create the store at ``path``, or resume the one there.

        A store with the same key, patch count, feature dim, dtype and coords is resumed: its
        chunks with a completion marker are re-read and checked against the marker's checksum
        and kept when they match (bad ones become pending again; a COMPLETE marker that no
        longer holds is removed). Its chunk size is adopted even if ``chunk_rows`` differs.
        Any other slidepipe store there (another key, shape or dtype), or any store when
        ``overwrite`` is true, is replaced as a whole: features of two settings never mix.
        A folder that is not a slidepipe feature store is only replaced with ``overwrite``.

        A fresh store is built under a temporary name and renamed into place once its coords
        and attributes are written, so a half-created store never appears under ``path``.
        """
        path = Path(path)
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string (hash of slide + settings)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if feature_dim < 1 or chunk_rows < 1:
            raise ValueError(f"feature_dim ({feature_dim}) and chunk_rows ({chunk_rows}) "
                             "must be positive")
        coords = _validated_coords(coords)
        requested = StoreLayout(key=key, num_patches=len(coords), feature_dim=int(feature_dim),
                                dtype=dtype, chunk_rows=max(1, min(chunk_rows, len(coords))))
        merged = _store_attributes(attributes, requested)
        _sweep_creation_leftovers(path)
        if path.exists() and not path.is_dir():
            if not overwrite:
                raise FeatureStoreError(f"{path} is a file, not a feature store; remove it or "
                                        "pass overwrite=True (--overwrite)")
            path.unlink()
        if path.exists() and not overwrite:
            try:
                _, existing = read_layout(path)
            except FeatureStoreError as exc:
                raise FeatureStoreError(f"{exc}; refusing to replace it: choose another output "
                                        "path or pass overwrite=True (--overwrite)") from exc
            reason = _resume_blocker(path, existing, requested, coords)
            if reason is None:
                writer = cls(path, existing)
                writer._recheck_written()
                return writer
            logger.info("replacing feature store %s: %s", path, reason)
        _create(path, requested, coords, merged)
        return cls(path, requested)

    @classmethod
    def attach(cls, path: str | Path, *, key: str | None = None) -> Self:
        """A writer for the store that :meth:`open` already created or resumed at ``path``.

        For worker processes that were handed only the path: reads the layout, verifies and
        changes nothing. With ``key`` it refuses a store made with other settings.
        """
        path = Path(path)
        if not path.is_dir():
            raise FeatureStoreError(f"no feature store at {path}; create it with "
                                    "FeatureStoreWriter.open before writing chunks")
        _, layout = read_layout(path)
        if key is not None and layout.key != key:
            raise FeatureStoreError(f"feature store {path} has key {layout.key!r}, not {key!r} "
                                    "(replaced by another run); refusing to write into it")
        return cls(path, layout)

    def _recheck_written(self) -> None:
        """On resume: keep marked chunks whose bytes still match; make the others pending."""
        removed = sweep_partials(self.path)
        digests = valid_markers(self.path, self.layout)
        bad = verify_chunks(self.path, self.layout, digests)
        good = len(digests) - len(bad)
        if good < self.num_chunks:
            complete_path(self.path).unlink(missing_ok=True)
        drop_markers(self.path, sorted(bad))
        for index, problem in sorted(bad.items()):
            logger.warning("feature store %s: chunk %d will be recomputed: %s",
                           self.path, index, problem)
        logger.info("feature store %s: resuming, %d of %d chunks kept (%d temporary files "
                    "removed)", self.path, good, self.num_chunks, removed)

    def pending_chunks(self) -> list[int]:
        """Chunks without a valid completion marker, in order (read from disk on each call)."""
        digests = valid_markers(self.path, self.layout)
        return [index for index in range(self.num_chunks) if index not in digests]

    def chunk_slice(self, index: int) -> slice:
        """The rows of chunk ``index``: ``coords[chunk_slice(i)]`` are the patches it holds."""
        return self.layout.chunk_slice(index)

    def _check_identity(self, *, allow_complete: bool) -> None:
        """Refuse to touch a store that was replaced (another key/shape) or already finished."""
        if not self.path.is_dir():
            raise FeatureStoreError(f"feature store {self.path} no longer exists (removed or "
                                    "being replaced by another run); rerun extraction")
        _, layout = read_layout(self.path)
        if layout != self.layout:
            raise FeatureStoreError(
                f"feature store {self.path} was replaced by another run (now key "
                f"{layout.key!r}, N={layout.num_patches}, {layout.dtype}); this writer "
                f"(key {self.layout.key!r}) refuses to write so that settings never mix")
        if not allow_complete and complete_path(self.path).exists():
            raise FeatureStoreError(f"feature store {self.path} is already complete; open it "
                                    "with overwrite=True (--overwrite) to recompute it")

    def write_chunk(self, index: int, features: np.ndarray) -> None:
        """Store ``features`` (the rows of :meth:`chunk_slice`) and mark the chunk complete.

        The chunk is written into the zarr array and flushed to disk, then a completion marker
        holding the sha256 of the cast bytes is written atomically. Safe to call from separate
        processes for different chunks of the same store.
        """
        rows = self.layout.chunk_slice(index)
        values = np.asarray(features)
        expected = (rows.stop - rows.start, self.layout.feature_dim)
        if values.shape != expected:
            raise ValueError(f"chunk {index} of {self.path} needs features of shape {expected}, "
                             f"got {values.shape}")
        if not (np.issubdtype(values.dtype, np.floating)
                or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"features must be real numbers, got dtype {values.dtype}")
        with np.errstate(over="ignore"):  # overflow is reported below with the chunk named
            cast = np.ascontiguousarray(values, dtype=self.layout.dtype)
        if self.layout.dtype == "float16":
            overflow = int(np.count_nonzero(np.isinf(cast) & np.isfinite(values)))
            if overflow:
                raise FeatureStoreError(
                    f"chunk {index} of {self.path}: {overflow} values exceed the float16 range "
                    "(±65504); create the store with dtype='float32'")
        self._check_identity(allow_complete=False)
        marker_path(self.path, index).unlink(missing_ok=True)
        array = zarr.open_array(self.path / FEATURES, mode="r+", zarr_format=3)
        array.with_config({"write_empty_chunks": True})[rows] = cast
        chunk_file = self.path / FEATURES / "c" / str(index) / "0"
        fsync_path(chunk_file)
        fsync_path(chunk_file.parent)
        write_marker(self.path, self.layout, index, chunk_digest(cast, self.layout.dtype))

    def finalize(self) -> None:
        """Verify every chunk against its marker, then write the COMPLETE marker.

        Raises IncompleteStoreError when chunks are still pending, and CorruptStoreError after
        deleting the markers of chunks that fail to decode or to match (the next run
        recomputes exactly those).
        """
        self._check_identity(allow_complete=True)
        digests = valid_markers(self.path, self.layout)
        pending = [index for index in range(self.num_chunks) if index not in digests]
        if pending:
            complete_path(self.path).unlink(missing_ok=True)
            raise IncompleteStoreError(self.path, pending, self.num_chunks)
        bad = verify_chunks(self.path, self.layout, digests)
        if bad:
            complete_path(self.path).unlink(missing_ok=True)
            drop_markers(self.path, sorted(bad))
            raise CorruptStoreError(self.path, bad, markers_removed=True)
        write_complete(self.path, self.layout, digests)
        logger.info("feature store %s complete: %d patches x %d (%s)", self.path,
                    self.layout.num_patches, self.layout.feature_dim, self.layout.dtype)
