"""The feature store: one zarr v3 group per slide and backbone, crash-safe and resumable.

A store holds ``features`` (N, D) float16/float32, chunked along N and zstd-compressed, and
``coords`` (N, 2) int64 level-0 corners, with provenance in the group attributes
(``schema: "slidepipe.features/1"`` and the caller's ``key``, a hash of slide + settings).

Completeness is never inferred from the arrays: each chunk gets a completion marker holding
the sha256 of its bytes once it is on disk, and ``_progress/COMPLETE.json`` is written only
after :meth:`FeatureStoreWriter.finalize` re-read every chunk and matched every checksum.
A run killed at any instant leaves a store that reports ``incomplete`` and resumes with only
the missing chunks; a store made with other settings reports ``stale`` and is replaced, never
mixed. See :mod:`pipelines.feature_store._layout` for the folder layout.
"""

from .errors import CorruptStoreError, FeatureStoreError, IncompleteStoreError
from .interop import export_hdf5, export_pt, import_h5
from .reader import FeatureStore, StoreStatus, open_features, store_status
from .writer import FeatureStoreWriter

__all__ = [
    "CorruptStoreError",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreWriter",
    "IncompleteStoreError",
    "StoreStatus",
    "export_hdf5",
    "export_pt",
    "import_h5",
    "open_features",
    "store_status",
]
