"""Reading a feature store: status checks and a lazy reader for mil/ and the exporters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr

from ._layout import (
    COORDS,
    FEATURES,
    StoreLayout,
    read_complete,
    read_layout,
    valid_markers,
    verify_chunks,
)
from .errors import CorruptStoreError, FeatureStoreError, IncompleteStoreError

StoreStatus = Literal["missing", "complete", "incomplete", "stale"]


def store_status(path: str | Path, key: str | None = None) -> StoreStatus:
    """Where the store at ``path`` stands, without reading any features.

    ``missing``: nothing there. ``complete``: a valid COMPLETE marker for the store's current
    layout (checksums are not re-read; use ``open_features(verify=True)`` for that).
    ``incomplete``: a slidepipe store of this key without it (killed, still running, or
    found corrupt). ``stale``: something else is there: a store made with another ``key``
    (slide or settings changed), or a folder that is not a readable slidepipe feature store.
    With ``key=None`` the key is not compared.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        _, layout = read_layout(path)
    except FeatureStoreError:
        return "stale"
    if key is not None and layout.key != key:
        return "stale"
    return "complete" if read_complete(path, layout) is not None else "incomplete"


class FeatureStore:
    """Lazy, read-only view of one store; get it from :func:`open_features`.

    ``features()`` reads only the chunks the requested rows live in. The object pickles
    without its open handles, so it can be sent to DataLoader or Dask workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.attrs: dict[str, Any]
        self.layout: StoreLayout
        self.attrs, self.layout = read_layout(self.path)
        self._array: zarr.Array | None = None
        self._coords: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "attrs": self.attrs, "layout": self.layout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.attrs, self.layout = state["path"], state["attrs"], state["layout"]
        self._array = None
        self._coords = None

    def __len__(self) -> int:
        return self.layout.num_patches

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, N={self.num_patches}, D={self.feature_dim}, "
                f"{self.dtype}, key={self.key!r})")

    @property
    def key(self) -> str:
        """The caller's hash of slide content + settings the store was made with."""
        return self.layout.key

    @property
    def num_patches(self) -> int:
        """N, the number of patches (rows)."""
        return self.layout.num_patches

    @property
    def feature_dim(self) -> int:
        """D, the feature width of the backbone."""
        return self.layout.feature_dim

    @property
    def dtype(self) -> np.dtype[Any]:
        """The stored dtype (float16 or float32)."""
        return np.dtype(self.layout.dtype)

    @property
    def num_chunks(self) -> int:
        """Stored chunks along N."""
        return self.layout.num_chunks

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left corners, read once and cached (read-only)."""
        if self._coords is None:
            array = zarr.open_array(self.path / COORDS, mode="r", zarr_format=3)
            coords = np.asarray(array[:], dtype=np.int64).reshape(-1, 2)
            coords.flags.writeable = False
            self._coords = coords
        return self._coords

    def _features_array(self) -> zarr.Array:
        if self._array is None:
            self._array = zarr.open_array(self.path / FEATURES, mode="r", zarr_format=3)
        return self._array

    def features(self, rows: slice | np.ndarray | None = None,
                 dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """Feature rows as an array of ``dtype`` (None: the stored dtype).

        ``rows``: None (all), a slice, integer indices (any order, repeats and negative
        indices allowed) or a boolean mask of length N. Only the chunks touched are read.
        """
        n = self.num_patches
        array = self._features_array()
        if rows is None:
            values = array[:]
        elif isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                values = array[start:max(start, stop)]
            else:
                values = self._take(np.arange(start, stop, step))
        else:
            index = np.asarray(rows)
            if index.dtype == bool:
                if index.shape != (n,):
                    raise IndexError(f"boolean mask of shape {index.shape} does not match "
                                     f"{n} patches")
                index = np.flatnonzero(index)
            elif index.ndim != 1 or not (index.size == 0
                                         or np.issubdtype(index.dtype, np.integer)):
                raise TypeError(f"rows must be None, a slice, 1-D integer indices or a boolean "
                                f"mask, got an array of dtype {index.dtype} and shape "
                                f"{index.shape}")
            index = index.astype(np.int64)
            index = np.where(index < 0, index + n, index)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise IndexError(f"row indices out of range for {n} patches")
            values = self._take(index)
        return np.asarray(values, dtype=self.dtype if dtype is None else dtype)

    def _take(self, index: np.ndarray) -> np.ndarray:
        if index.size == 0:
            return np.empty((0, self.feature_dim), dtype=self.dtype)
        return np.asarray(self._features_array().oindex[index, :])

    def iter_chunks(self, dtype: npt.DTypeLike | None = np.float32
                    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, features)`` one stored chunk at a time (memory bounded by a chunk)."""
        for index in range(self.num_chunks):
            rows = self.layout.chunk_slice(index)
            yield rows, self.features(rows, dtype=dtype)

    def verify(self) -> None:
        """Re-read every chunk and compare it with its marker; CorruptStoreError on failure.

        Read-only: markers are left in place (the next extraction run re-verifies the store
        and recomputes the bad chunks).
        """
        digests = valid_markers(self.path, self.layout)
        problems = {index: f"{self.layout.describe_chunk(index)}: completion marker missing, "
                           "so it cannot be verified"
                    for index in range(self.num_chunks) if index not in digests}
        problems.update(verify_chunks(self.path, self.layout, digests))
        if problems:
            raise CorruptStoreError(self.path, problems, markers_removed=False)


def open_features(path: str | Path, *, verify: bool = False) -> FeatureStore:
    """Open a complete store for reading.

    Raises FeatureStoreError when nothing usable is at ``path``, IncompleteStoreError when the
    COMPLETE marker is missing, and (with ``verify``) CorruptStoreError when a chunk fails to
    decode or to match its checksum.
    """
    path = Path(path)
    if not path.exists():
        raise FeatureStoreError(f"no feature store at {path}; run feature extraction for this "
                                "slide first")
    store = FeatureStore(path)
    if read_complete(path, store.layout) is None:
        digests = valid_markers(path, store.layout)
        pending = [index for index in range(store.num_chunks) if index not in digests]
        raise IncompleteStoreError(path, pending, store.num_chunks)
    if verify:
        store.verify()
    return store
