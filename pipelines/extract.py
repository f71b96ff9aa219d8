"""Feature extraction over an archive as one Dask graph.

Per slide: the grid (made by the tiling stage when missing or made with other settings) is cut
into chunks of ``chunk_rows`` patches, one zarr chunk each; a task per chunk reads, embeds and
writes it (:mod:`pipelines.extract_worker`). All chunks of all slides are submitted together,
so the model workers never idle between slides. The client finalises a slide's store (verifies
every chunk, then marks it complete) as soon as its last chunk lands, then exports it for CLAM /
TRIDENT users. A slide that fails is recorded and the others go on.

Stores are keyed by the slide's content hash and every setting that changes its features;
complete stores with the same key are skipped, incomplete ones resume where they stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distributed import as_completed

import wsi
from wsi.grid_store import PROVENANCE_NAME

from . import __version__
from .backbones import Backbone, load_backbone
from .cluster import MODEL_RESOURCE, dask_client, default_torch_threads, default_workers
from .config import SlidepipeConfig
from .discovery import SlideEntry
from .extract_worker import ChunkJob, ChunkResult, run_chunk
from .feature_store import FeatureStoreWriter, export_hdf5, export_pt, open_features, store_status
from .tile import TileResult, grid_folder_is_current, tile_slide

log = logging.getLogger(__name__)

FEATURES_SCHEMA = "slidepipe.features/1"


@dataclass
class ExtractResult:
    """One row of the extraction summary."""

    slide_id: str
    path: str
    status: str  # ok, cached, no_tissue, failed
    patches: int = 0
    seconds: float = 0.0
    patches_per_second: float = 0.0
    store: str = ""
    error: str = ""


@dataclass
class _SlidePlan:
    entry: SlideEntry
    result: ExtractResult
    store: Path
    key: str = ""
    pending: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)


def backbone_tag(name: str) -> str:
    """A file-system-safe name for a backbone (``hf-hub:org/model`` → ``hf-hub_org_model``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def features_key(slide_hash: str, backbone: Backbone, config: SlidepipeConfig) -> str:
    """The identity of a slide's features: everything that changes a feature value."""
    parts = {
        "schema": FEATURES_SCHEMA, "slide": slide_hash, "backbone": backbone.spec.name,
        "weights": backbone.weights_hash, "slides": config.slides.model_dump(mode="json"),
        "tissue": config.tissue.model_dump(mode="json"),
        "tiling": config.tiling.model_dump(mode="json"), "qc": config.qc.model_dump(mode="json"),
        "stain": config.stain.model_dump(mode="json"), "dtype": config.extraction.dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _provenance(entry: SlideEntry, slide_hash: str, grid: wsi.TileGrid, backbone: Backbone,
                config: SlidepipeConfig) -> dict[str, Any]:
    return {
        "slide_path": str(entry.path), "slide_id": entry.slide_id, "slide_hash": slide_hash,
        "backbone": backbone.spec.name, "backbone_source": backbone.spec.source,
        "weights_hash": backbone.weights_hash, "pretrained": config.backbone.pretrained,
        "feature_dim": backbone.spec.feature_dim, "grid": grid.spec.as_dict(),
        "tissue": config.tissue.model_dump(mode="json"), "slidepipe_version": __version__,
        "config": config.resolved(), "created": datetime.now(UTC).isoformat(),
    }


def _ensure_grid(entry: SlideEntry, config: SlidepipeConfig, out: Path,
                 overrides: dict[str, float] | None) -> TileResult | None:
    """Tile the slide unless a grid made with the same settings is there; returns the tiling
    result when it had to tile."""
    if grid_folder_is_current(out / entry.slide_id, entry, config):
        return None
    return tile_slide(entry, config, out, overrides)


def _plan_slide(entry: SlideEntry, config: SlidepipeConfig, out: Path, backbone: Backbone,
                overrides: dict[str, float] | None, torch_threads: int,
                ) -> tuple[_SlidePlan, list[ChunkJob]]:
    result = ExtractResult(slide_id=entry.slide_id, path=str(entry.path), status="failed")
    store = out / entry.slide_id / f"features_{backbone_tag(backbone.spec.name)}.zarr"
    plan = _SlidePlan(entry=entry, result=result, store=store)
    tiled = _ensure_grid(entry, config, out, overrides)
    if tiled is not None and tiled.status == "failed":
        result.error = tiled.error
        return plan, []
    grid = wsi.load_grid(out / entry.slide_id)
    provenance = json.loads((out / entry.slide_id / PROVENANCE_NAME).read_text())
    slide_hash = provenance["provenance"]["slide_hash"]
    mpp = provenance["provenance"]["slide"]["mpp_x"] if provenance["provenance"]["slide"][
        "mpp_source"] == "override" else None
    key = plan.key = features_key(slide_hash, backbone, config)
    result.store = str(store)
    result.patches = len(grid)
    status = store_status(store, key)
    if status == "complete" and not config.extraction.overwrite:
        result.status = "cached"
        return plan, []
    writer = FeatureStoreWriter.open(
        store, key=key, coords=grid.coords, feature_dim=backbone.spec.feature_dim,
        chunk_rows=config.extraction.chunk_rows, dtype=config.extraction.dtype,
        attributes=_provenance(entry, slide_hash, grid, backbone, config),
        overwrite=config.extraction.overwrite)
    plan.pending = set(writer.pending_chunks())
    backbone_config = config.backbone.model_dump(mode="json")
    jobs = [ChunkJob(slide_path=str(entry.path), backend=config.slides.backend, mpp=mpp,
                     spec=grid.spec, coords=grid.coords[writer.chunk_slice(index)],
                     store_path=str(store), store_key=key, chunk=index, backbone=backbone_config,
                     stain=config.stain.model_dump(mode="json"),
                     decode_threads=config.extraction.decode_threads,
                     torch_threads=torch_threads)
            for index in sorted(plan.pending)]
    return plan, jobs


def _finish_slide(plan: _SlidePlan, out: Path, config: SlidepipeConfig, tag: str) -> None:
    result = plan.result
    FeatureStoreWriter.attach(plan.store, key=plan.key).finalize()
    store = open_features(plan.store)
    exports = out / f"features_{tag}"
    if config.extraction.export_hdf5:
        (exports / "h5_files").mkdir(parents=True, exist_ok=True)
        export_hdf5(store, exports / "h5_files" / f"{plan.entry.slide_id}.h5")
    if config.extraction.export_pt:
        (exports / "pt_files").mkdir(parents=True, exist_ok=True)
        export_pt(store, exports / "pt_files" / f"{plan.entry.slide_id}.pt")
    result.seconds = round(time.perf_counter() - plan.started, 3)
    result.patches_per_second = round(result.patches / max(result.seconds, 1e-9), 1)
    result.status = "ok" if result.patches else "no_tissue"


def extract_archive(entries: list[SlideEntry], config: SlidepipeConfig, out: Path,
                    overrides: dict[str, float] | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    announce: Callable[[str], None] = log.info) -> list[ExtractResult]:
    """Extract features for every slide; never raises for one bad slide.

    ``on_progress(slide_id, patches_done, patches_total)`` is called as chunks land;
    ``announce`` receives the line naming the cluster and its dashboard.
    """
    # loaded once here for its identity (feature size, weights hash); workers load their own
    backbone = load_backbone(config.backbone.model_copy(update={"device": "cpu",
                                                                "compile": False}))
    tag = backbone_tag(backbone.spec.name)
    torch_threads = default_torch_threads(config.cluster, default_workers(config.cluster))
    plans: dict[str, _SlidePlan] = {}
    jobs: list[ChunkJob] = []
    for entry in entries:
        try:
            plan, slide_jobs = _plan_slide(entry, config, out, backbone, overrides,
                                           torch_threads)
        except Exception as error:  # a bad slide or store must not stop the archive
            log.exception("%s: cannot plan extraction", entry.path)
            plan = _SlidePlan(entry=entry, store=Path(),
                              result=ExtractResult(entry.slide_id, str(entry.path), "failed",
                                                   error=f"{type(error).__name__}: {error}"))
            slide_jobs = []
        plans[str(plan.store)] = plan
        jobs.extend(slide_jobs)
        if not slide_jobs and plan.result.status != "failed" and plan.result.status != "cached":
            _finish_slide(plan, out, config, tag)
    if jobs:
        _run_jobs(jobs, plans, out, config, tag, on_progress, announce)
    return [plan.result for plan in plans.values()]


def _run_jobs(jobs: list[ChunkJob], plans: dict[str, _SlidePlan], out: Path,
              config: SlidepipeConfig, tag: str,
              on_progress: Callable[[str, int, int], None] | None,
              announce: Callable[[str], None]) -> None:
    done_patches: dict[str, int] = {key: 0 for key in plans}
    with dask_client(config.cluster, announce) as client:
        run_id = time.time_ns()
        by_key = {}
        for job in jobs:
            future = client.submit(run_chunk, job, resources={MODEL_RESOURCE: 1}, pure=False,
                                   key=f"extract-{run_id}-{Path(job.store_path).parent.name}"
                                       f"-{job.chunk}")
            by_key[future.key] = (future, job)
        for future in as_completed([f for f, _ in by_key.values()]):
            job = by_key[future.key][1]
            plan = plans[job.store_path]
            if plan.result.status == "failed" and plan.result.error:
                continue
            try:
                chunk: ChunkResult = future.result()
            except Exception as error:
                plan.result.error = f"chunk {job.chunk}: {type(error).__name__}: {error}"
                log.error("%s: %s", plan.entry.path, plan.result.error)
                continue
            plan.pending.discard(chunk.chunk)
            done_patches[job.store_path] += chunk.patches
            if on_progress is not None:
                on_progress(plan.entry.slide_id, done_patches[job.store_path],
                            plan.result.patches)
            if not plan.pending:
                try:
                    _finish_slide(plan, out, config, tag)
                except Exception as error:
                    plan.result.error = f"{type(error).__name__}: {error}"
                    log.exception("%s: cannot finalise the feature store", plan.entry.path)
