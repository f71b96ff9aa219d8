"""What Dask workers do to extract a slide's features, in three kinds of task:

* :func:`prepare_slide` (any worker): tile the slide unless a current grid is there, then
  create or resume its feature store and return one :class:`ChunkJob` per missing chunk;
* :func:`run_chunk` (a model worker): read and decode the chunk's patches (a few threads, each
  with its own tile-decoding reader, prefetching ahead of the model), run the backbone, and
  write the chunk into the store;
* :func:`finalize_slide` (any worker): verify every chunk, mark the store complete and write
  the CLAM/TRIDENT exports.

Stores are keyed by the slide's content hash and every setting that changes its features
(:func:`features_key`). Models, stain normalisers and open slides are cached per worker
process, so a worker loads its model once however many chunks and slides it serves.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import wsi
from wsi.grid_store import PROVENANCE_NAME
from wsi.tiling import GridSpec

from . import __version__
from .backbones import Backbone, BackboneConfig, load_backbone
from .config import SlidepipeConfig
from .discovery import SlideEntry
from .feature_store import FeatureStoreWriter, export_hdf5, export_pt, open_features, store_status
from .inference import Embedder
from .stain import StainConfig, make_stain_normaliser
from .tile import TileResult, grid_folder_is_current, make_grid

FEATURES_SCHEMA = "slidepipe.features/1"


@dataclass(frozen=True)
class BackboneIdentity:
    """What identifies a backbone's features: its name, weights and output size (small and
    picklable, unlike the loaded model)."""

    name: str
    source: str
    weights_hash: str
    feature_dim: int

    @classmethod
    def of(cls, backbone: Backbone) -> BackboneIdentity:
        """The identity of a loaded backbone."""
        return cls(name=backbone.spec.name, source=backbone.spec.source,
                   weights_hash=backbone.weights_hash, feature_dim=backbone.spec.feature_dim)


def backbone_tag(name: str) -> str:
    """A file-system-safe name for a backbone (``hf-hub:org/model`` → ``hf-hub_org_model``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def features_key(slide_hash: str, backbone: BackboneIdentity, config: SlidepipeConfig) -> str:
    """The identity of a slide's features: everything that changes a feature value."""
    parts = {
        "schema": FEATURES_SCHEMA, "slide": slide_hash, "backbone": backbone.name,
        "weights": backbone.weights_hash, "slides": config.slides.model_dump(mode="json"),
        "tissue": config.tissue.model_dump(mode="json"),
        "tiling": config.tiling.model_dump(mode="json"), "qc": config.qc.model_dump(mode="json"),
        "stain": config.stain.model_dump(mode="json"), "dtype": config.extraction.dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def store_path(out: str | Path, slide_id: str, backbone_name: str) -> Path:
    """Where the features of ``slide_id`` live under the output folder ``out``."""
    return Path(out) / slide_id / f"features_{backbone_tag(backbone_name)}.zarr"


def export_paths(out: str | Path, slide_id: str, backbone_name: str,
                 config: SlidepipeConfig) -> list[Path]:
    """The CLAM/TRIDENT files the configuration asks for (``h5_files/``, ``pt_files/``)."""
    folder = Path(out) / f"features_{backbone_tag(backbone_name)}"
    wanted = [("h5_files", ".h5", config.extraction.export_hdf5),
              ("pt_files", ".pt", config.extraction.export_pt)]
    return [folder / kind / f"{slide_id}{suffix}" for kind, suffix, on in wanted if on]


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs for one chunk; small and picklable."""

    slide_path: str
    backend: str
    mpp: float | None
    spec: GridSpec
    coords: np.ndarray
    store_path: str
    store_key: str
    chunk: int
    backbone: dict[str, Any]
    stain: dict[str, Any]
    decode_threads: int
    torch_threads: int


@dataclass(frozen=True)
class ChunkResult:
    """What came back from a chunk: for progress and throughput lines."""

    store_path: str
    chunk: int
    patches: int
    seconds: float


_cache_lock = threading.Lock()
_embedders: dict[str, Embedder] = {}
_normalisers: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {}
_slides: dict[tuple[str, str, float | None], wsi.Slide] = {}


def cached_embedder(backbone: dict[str, Any], torch_threads: int) -> Embedder:
    """The worker process's embedder for ``backbone`` (a BackboneConfig as JSON), loaded once
    with ``torch_threads`` torch threads."""
    key = json.dumps(backbone, sort_keys=True, default=str)
    with _cache_lock:
        if key not in _embedders:
            import torch

            torch.set_num_threads(torch_threads)
            _embedders[key] = Embedder(load_backbone(BackboneConfig.model_validate(backbone)))
        return _embedders[key]


def _normaliser(stain: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
    key = json.dumps(stain, sort_keys=True, default=str)
    with _cache_lock:
        if key not in _normalisers:
            _normalisers[key] = make_stain_normaliser(StainConfig.model_validate(stain))
        return _normalisers[key]


def _slide(path: str, backend: str, mpp: float | None) -> wsi.Slide:
    key = (path, backend, mpp)
    with _cache_lock:
        if key not in _slides:
            _slides[key] = wsi.open_slide(path, backend, mpp=mpp)
        return _slides[key]


def prefetched_batches(slide: wsi.Slide, spec: GridSpec, coords: np.ndarray, batch_size: int,
                       threads: int) -> Iterator[np.ndarray]:
    """Batches of patches in order, decoded by ``threads`` readers running ahead of the
    consumer (at most ``threads + 1`` batches in flight, so memory stays bounded)."""
    local = threading.local()
    readers: list[wsi.PatchReader] = []

    def read(start: int) -> np.ndarray:
        reader = getattr(local, "reader", None)
        if reader is None:
            reader = local.reader = wsi.PatchReader(slide, spec)
            readers.append(reader)
        return reader.read_batch(coords[start:start + batch_size])

    starts = iter(range(0, len(coords), batch_size))
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
            pending = deque(pool.submit(read, s) for _, s in zip(range(threads + 1), starts,
                                                                     strict=False))
            while pending:
                batch = pending.popleft().result()
                following = next(starts, None)
                if following is not None:
                    pending.append(pool.submit(read, following))
                yield batch
    finally:
        for reader in readers:
            reader.close()


@dataclass(frozen=True)
class PrepareJob:
    """One slide to tile (when needed) and, with a backbone, to plan extraction for in chunks of
    ``chunk_rows`` patches, each embedded with ``torch_threads`` threads."""

    entry: SlideEntry
    config: SlidepipeConfig
    out: str
    mpp_overrides: dict[str, float] | None
    backbone: BackboneIdentity | None
    torch_threads: int
    chunk_rows: int


@dataclass(frozen=True)
class PreparedSlide:
    """A slide with its grid on disk and, when extracting, its store opened.

    ``tiling`` is ``None`` when a grid made with the same settings was reused. ``cached``: the
    store is complete with this key and its exports exist. ``chunks`` are the chunks still to
    compute; none and not cached means the store only needs finalising.
    """

    slide_hash: str
    patches: int
    grid: dict[str, Any]
    tiling: TileResult | None = None
    store: str = ""
    key: str = ""
    cached: bool = False
    chunks: tuple[ChunkJob, ...] = ()


@dataclass(frozen=True)
class FinalizeJob:
    """A store whose chunks are all written: verify it, mark it complete, export it."""

    store: str
    key: str
    exports: tuple[str, ...]


def _provenance(entry: SlideEntry, slide_hash: str, grid: wsi.TileGrid,
                backbone: BackboneIdentity, config: SlidepipeConfig) -> dict[str, Any]:
    return {
        "slide_path": str(entry.path), "slide_id": entry.slide_id, "slide_hash": slide_hash,
        "backbone": backbone.name, "backbone_source": backbone.source,
        "weights_hash": backbone.weights_hash, "pretrained": config.backbone.pretrained,
        "feature_dim": backbone.feature_dim, "grid": grid.spec.as_dict(),
        "tissue": config.tissue.model_dump(mode="json"), "slidepipe_version": __version__,
        "config": config.resolved(), "created": datetime.now(UTC).isoformat(),
    }


def prepare_slide(job: PrepareJob) -> PreparedSlide:
    """Tile the slide unless a current grid is there (raises when it cannot be tiled), then,
    with a backbone, create or resume its feature store and list the chunks to compute."""
    entry, config, out = job.entry, job.config, Path(job.out)
    folder = out / entry.slide_id
    tiling = None
    if not grid_folder_is_current(folder, entry, config, job.mpp_overrides):
        tiling = make_grid(entry, config, out, job.mpp_overrides)
    record = json.loads((folder / PROVENANCE_NAME).read_text())["provenance"]
    grid = wsi.load_grid(folder)
    slide_hash = record["slide_hash"]
    prepared = PreparedSlide(slide_hash=slide_hash, patches=len(grid), tiling=tiling,
                             grid={"backend": record["slide"]["backend"],
                                   "mpp": record["slide"]["mpp_x"], **grid.spec.as_dict()})
    if job.backbone is None:
        return prepared
    store = store_path(out, entry.slide_id, job.backbone.name)
    key = features_key(slide_hash, job.backbone, config)
    planned = {"store": str(store), "key": key}
    if store_status(store, key) == "complete" and not config.extraction.overwrite:
        exports = export_paths(out, entry.slide_id, job.backbone.name, config)
        return replace(prepared, **planned, cached=all(path.exists() for path in exports))
    writer = FeatureStoreWriter.open(
        store, key=key, coords=grid.coords, feature_dim=job.backbone.feature_dim,
        chunk_rows=job.chunk_rows, dtype=config.extraction.dtype,
        attributes=_provenance(entry, slide_hash, grid, job.backbone, config),
        overwrite=config.extraction.overwrite)
    mpp = record["slide"]["mpp_x"] if record["slide"]["mpp_source"] == "override" else None
    backbone_config = config.backbone.model_dump(mode="json")
    chunks = tuple(
        ChunkJob(slide_path=str(entry.path), backend=config.slides.backend, mpp=mpp,
                 spec=grid.spec, coords=grid.coords[writer.chunk_slice(index)],
                 store_path=str(store), store_key=key, chunk=index, backbone=backbone_config,
                 stain=config.stain.model_dump(mode="json"),
                 decode_threads=config.extraction.decode_threads,
                 torch_threads=job.torch_threads)
        for index in writer.pending_chunks())
    return replace(prepared, **planned, chunks=chunks)


def finalize_slide(job: FinalizeJob) -> int:
    """Verify and complete the store, write its exports; returns its number of patches."""
    FeatureStoreWriter.attach(job.store, key=job.key).finalize()
    store = open_features(job.store)
    for export in map(Path, job.exports):
        export.parent.mkdir(parents=True, exist_ok=True)
        (export_hdf5 if export.suffix == ".h5" else export_pt)(store, export)
    return len(store)


def run_chunk(job: ChunkJob) -> ChunkResult:
    """Extract and store the features of one chunk (runs on a Dask worker)."""
    start = time.perf_counter()
    embedder = cached_embedder(job.backbone, job.torch_threads)
    normalise = _normaliser(job.stain)
    slide = _slide(job.slide_path, job.backend, job.mpp)
    batch_size = embedder.backbone.batch_size
    parts = []
    for batch in prefetched_batches(slide, job.spec, job.coords, batch_size,
                                    job.decode_threads):
        parts.append(embedder(normalise(batch) if normalise is not None else batch))
    features = (np.concatenate(parts) if parts else
                np.zeros((0, embedder.feature_dim), dtype=np.float32))
    FeatureStoreWriter.attach(job.store_path, key=job.store_key).write_chunk(job.chunk, features)
    return ChunkResult(job.store_path, job.chunk, len(job.coords), time.perf_counter() - start)
