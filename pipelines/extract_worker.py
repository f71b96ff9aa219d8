"""What a Dask worker does for one chunk of one slide: read and decode its patches (a few
threads, each with its own tile-decoding reader, prefetching ahead of the model), run the
backbone, and write the chunk into the slide's feature store.

Models, stain normalisers and open slides are cached per worker process, so a worker loads its
model once however many chunks and slides it serves.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

import wsi
from wsi.tiling import GridSpec

from .backbones import BackboneConfig, load_backbone
from .feature_store import FeatureStoreWriter
from .inference import Embedder
from .stain import StainConfig, make_stain_normaliser


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


def _embedder(backbone: dict[str, Any], torch_threads: int) -> Embedder:
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


def run_chunk(job: ChunkJob) -> ChunkResult:
    """Extract and store the features of one chunk (runs on a Dask worker)."""
    start = time.perf_counter()
    embedder = _embedder(job.backbone, job.torch_threads)
    normalise = _normaliser(job.stain)
    slide = _slide(job.slide_path, job.backend, job.mpp)
    batch_size = int(job.backbone.get("batch_size", 64))
    parts = []
    for batch in prefetched_batches(slide, job.spec, job.coords, batch_size,
                                    job.decode_threads):
        parts.append(embedder(normalise(batch) if normalise is not None else batch))
    features = (np.concatenate(parts) if parts else
                np.zeros((0, embedder.feature_dim), dtype=np.float32))
    FeatureStoreWriter.attach(job.store_path, key=job.store_key).write_chunk(job.chunk, features)
    return ChunkResult(job.store_path, job.chunk, len(job.coords), time.perf_counter() - start)
