"""Feature extraction over an archive as one Dask graph.

Per slide, on the workers (:mod:`pipelines.extract_worker`): a task tiles the slide when its
grid is missing or was made with other settings and opens (or resumes) its feature store; then
one task per chunk of ``chunk_rows`` patches (one zarr chunk each; :data:`GPU_CHUNK_ROWS` or
:data:`CPU_CHUNK_ROWS` unless configured) reads, embeds and writes it on a model worker; then a
task verifies the store, marks it complete and exports it for CLAM / TRIDENT users.
:class:`SlideExtraction` is that chain for one slide, run by the engine of
:mod:`pipelines.run.flow` together with every other slide's, so the model workers never idle
between slides. ``slidepipe extract`` (:func:`extract_archive`) and ``slidepipe run`` share it.
A slide that fails is recorded and the others go on.

Stores are keyed by the slide's content hash and every setting that changes its features;
complete stores with the same key are skipped, incomplete ones resume where they stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi.grid_store import PROVENANCE_NAME

from .backbones import backbone_device, load_backbone
from .cluster import dask_client, default_torch_threads, default_workers
from .config import SlidepipeConfig
from .discovery import SlideEntry
from .extract_worker import (
    BackboneIdentity,
    ChunkResult,
    FinalizeJob,
    PreparedSlide,
    PrepareJob,
    backbone_tag,
    export_paths,
    features_key,
    finalize_slide,
    prepare_slide,
    run_chunk,
    store_path,
)
from .feature_store import open_features, store_status
from .run.flow import ArchiveFlow
from .run.steps import (
    EMBEDDING,
    FINISHING,
    STARTING,
    Failure,
    Next,
    SlideWork,
    StageOutcome,
    Step,
    Task,
    continue_after,
)
from .tile import grid_folder_is_current

log = logging.getLogger(__name__)

#: Patches per task and zarr chunk unless ``extraction.chunk_rows`` says otherwise. A task is the
#: unit Dask balances: at the end of a graph the workers that are done wait for the last tasks.
#: A CPU worker embeds 12-50 patches/s, so a 512-patch task is 10-43 s; 128 patches keeps that
#: wait to a few seconds (2-core machine, efficientnet_lite0: the workers were busy 97 % of a
#: 3024-patch call instead of 93-94 %, 5 % more patches/s). On a GPU a task of 128 patches is
#: over in a fraction of a second, and the hand-over to the next one would idle the GPU. The
#: client decides from its own device, so a CPU-only client of a GPU cluster gets CPU-sized
#: tasks unless ``chunk_rows`` is configured.
GPU_CHUNK_ROWS = 512
CPU_CHUNK_ROWS = 128

__all__ = ["CPU_CHUNK_ROWS", "GPU_CHUNK_ROWS", "ExtractResult", "ExtractionSetup",
           "SlideExtraction", "backbone_tag", "extract_archive", "features_key"]


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


@dataclass(frozen=True)
class ExtractionSetup:
    """What every slide of an extraction shares: the configuration, the output folder (slides
    go to ``out/<slide_id>/``), µm/px overrides, the backbone's identity, and the torch threads
    and patches per task the workers use."""

    config: SlidepipeConfig
    out: Path
    mpp_overrides: dict[str, float] | None
    backbone: BackboneIdentity
    torch_threads: int
    chunk_rows: int

    @classmethod
    def create(cls, config: SlidepipeConfig, out: Path,
               mpp_overrides: dict[str, float] | None = None) -> ExtractionSetup:
        """Load the backbone once, on the CPU, for its identity (feature size, weights hash);
        the workers load their own. Raises ``BackboneError`` when it cannot be loaded. Threads
        and chunk size default from this machine (a LocalCluster's)."""
        backbone = load_backbone(config.backbone.model_copy(update={"device": "cpu",
                                                                    "compile": False}))
        torch_threads = default_torch_threads(config.cluster, default_workers(config.cluster))
        on_gpu = backbone_device(config.backbone.device).type != "cpu"
        chunk_rows = config.extraction.chunk_rows or (GPU_CHUNK_ROWS if on_gpu else CPU_CHUNK_ROWS)
        return cls(config=config, out=Path(out), mpp_overrides=mpp_overrides,
                   backbone=BackboneIdentity.of(backbone), torch_threads=torch_threads,
                   chunk_rows=chunk_rows)

    def store(self, slide_id: str) -> Path:
        """The feature store of ``slide_id``."""
        return store_path(self.out, slide_id, self.backbone.name)

    @property
    def exports_folder(self) -> Path:
        """The folder of the CLAM/TRIDENT exports (``h5_files/``, ``pt_files/``)."""
        return self.out / f"features_{backbone_tag(self.backbone.name)}"

    def exports(self, slide_id: str) -> list[Path]:
        """The CLAM/TRIDENT exports of ``slide_id`` the configuration asks for."""
        return export_paths(self.out, slide_id, self.backbone.name, self.config)


def tiling_detail(prepared: PreparedSlide) -> dict[str, Any]:
    """What the tiling stage reports about a slide."""
    tiling = prepared.tiling
    return {"patches": prepared.patches, "no_tissue": prepared.patches == 0,
            "grid_reused": tiling is None, "slide_hash": prepared.slide_hash,
            "backend": prepared.grid.get("backend"), "mpp": prepared.grid.get("mpp"),
            "tissue_area_mm2": tiling.tissue_area_mm2 if tiling is not None else None}


class SlideExtraction:
    """The client-side chain of one slide through tiling and extraction.

    ``stages`` says which of ``tile`` and ``extract`` this run reports (preparing a slide for
    extraction reuses or remakes its grid either way); ``after`` continues the chain once the
    features are complete; ``on_chunk(chunk, patches_done, patches_total)`` follows the chunks
    as they land.
    """

    def __init__(self, entry: SlideEntry, setup: ExtractionSetup,
                 stages: tuple[str, ...] = ("tile", "extract"),
                 after: Callable[[], Next] | None = None,
                 on_chunk: Callable[[ChunkResult, int, int], None] | None = None) -> None:
        self.entry = entry
        self.setup = setup
        self.stages = stages
        self.after = after
        self.on_chunk = on_chunk
        self.prepared: PreparedSlide | None = None
        self._patches_done = 0

    def start(self) -> Next:
        """The first step: tile if needed and open the store."""
        setup = self.setup
        extracting = "extract" in self.stages
        job = PrepareJob(entry=self.entry, config=setup.config, out=str(setup.out),
                         mpp_overrides=setup.mpp_overrides,
                         backbone=setup.backbone if extracting else None,
                         torch_threads=setup.torch_threads, chunk_rows=setup.chunk_rows)
        stage = "tile" if "tile" in self.stages else "extract"
        return Next(step=Step(stage, [Task(prepare_slide, job, "cpu", "tile", STARTING)],
                              self._prepared))

    def _prepared(self, results: list[Any]) -> Next:
        prepared: PreparedSlide = results[0]
        self.prepared = prepared
        finished = []
        if "tile" in self.stages:
            finished.append(StageOutcome("tile", "done", tiling_detail(prepared)))
        if "extract" not in self.stages:
            return continue_after(finished, self.after)
        if prepared.cached:
            finished.append(StageOutcome("extract", "done", {
                "patches": prepared.patches, "cached": True, "store": prepared.store,
                "no_tissue": prepared.patches == 0}))
            return continue_after(finished, self.after)
        if prepared.chunks:
            self._patches_done = prepared.patches - sum(len(c.coords) for c in prepared.chunks)
            tasks = [Task(run_chunk, chunk, "model", f"chunk {chunk.chunk}", EMBEDDING)
                     for chunk in prepared.chunks]
            return Next(finished, Step("extract", tasks, lambda _: Next(step=self._finalize()),
                                       on_result=self._chunk_landed))
        return Next(finished, self._finalize())

    def _chunk_landed(self, chunk: ChunkResult) -> None:
        self._patches_done += chunk.patches
        if self.on_chunk is not None and self.prepared is not None:
            self.on_chunk(chunk, self._patches_done, self.prepared.patches)

    def _finalize(self) -> Step:
        assert self.prepared is not None
        job = FinalizeJob(store=self.prepared.store, key=self.prepared.key,
                          exports=tuple(map(str, self.setup.exports(self.entry.slide_id))))
        return Step("extract", [Task(finalize_slide, job, "cpu", "finalise", FINISHING)],
                    self._finalized)

    def _finalized(self, results: list[Any]) -> Next:
        patches: int = results[0]
        assert self.prepared is not None
        return continue_after([StageOutcome("extract", "done", {
            "patches": patches, "cached": False, "store": self.prepared.store,
            "no_tissue": patches == 0})], self.after)


class _ExtractEvents:
    """Fills one :class:`ExtractResult` as the slide goes through the engine."""

    def __init__(self, result: ExtractResult) -> None:
        self.result = result
        self.started = time.perf_counter()

    def stage_started(self, stage: str) -> None:
        """Nothing to record: the slide's clock runs from its admission."""

    def stage_finished(self, outcome: StageOutcome, seconds: float) -> None:
        result = self.result
        result.patches = outcome.detail.get("patches", result.patches)
        if outcome.stage != "extract":
            return
        result.store = outcome.detail["store"]
        if outcome.detail["cached"]:
            result.status = "cached"
            return
        result.seconds = round(time.perf_counter() - self.started, 3)
        result.patches_per_second = round(result.patches / max(result.seconds, 1e-9), 1)
        result.status = "no_tissue" if outcome.detail["no_tissue"] else "ok"

    def stage_failed(self, stage: str, failure: Failure, seconds: float) -> None:
        self.result.status = "failed"
        self.result.error = failure.message

    def stage_interrupted(self, stage: str) -> None:
        self.result.status = "failed"
        self.result.error = "stopped before it finished"


def _already_extracted(entry: SlideEntry, setup: ExtractionSetup) -> ExtractResult | None:
    """The result of a slide whose grid and complete store are there with the current
    settings (and its exports), without starting a cluster; None otherwise."""
    config = setup.config
    folder = setup.out / entry.slide_id
    if config.extraction.overwrite or not grid_folder_is_current(folder, entry, config,
                                                                 setup.mpp_overrides):
        return None
    record = json.loads((folder / PROVENANCE_NAME).read_text())["provenance"]
    store = setup.store(entry.slide_id)
    key = features_key(record["slide_hash"], setup.backbone, config)
    if store_status(store, key) != "complete" or not all(
            path.exists() for path in setup.exports(entry.slide_id)):
        return None
    return ExtractResult(entry.slide_id, str(entry.path), "cached",
                         patches=len(open_features(store)), store=str(store))


def extract_archive(entries: list[SlideEntry], config: SlidepipeConfig, out: Path,
                    overrides: dict[str, float] | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    announce: Callable[[str], None] = log.info) -> list[ExtractResult]:
    """Extract features for every slide; never raises for one bad slide.

    ``on_progress(slide_id, patches_done, patches_total)`` is called as chunks land;
    ``announce`` receives the line naming the cluster and its dashboard.
    """
    setup = ExtractionSetup.create(config, out, overrides)
    results: list[ExtractResult] = []
    works: list[SlideWork] = []
    for entry in entries:
        try:
            cached = _already_extracted(entry, setup)
        except (OSError, ValueError, KeyError):  # an unreadable record: extract again
            log.warning("%s: cannot read its earlier outputs; extracting again", entry.path,
                        exc_info=True)
            cached = None
        if cached is not None:
            results.append(cached)
            continue
        result = ExtractResult(slide_id=entry.slide_id, path=str(entry.path), status="failed")
        results.append(result)
        progress = (None if on_progress is None else
                    lambda _, done, total, slide_id=entry.slide_id: on_progress(slide_id, done,
                                                                                total))
        chain = SlideExtraction(entry, setup, on_chunk=progress)
        works.append(SlideWork(entry.slide_id, chain.start, _ExtractEvents(result)))
    if works:
        with dask_client(config.cluster, announce) as client:
            outcome = ArchiveFlow(client).run(works)
        if outcome.stop_reason is not None:
            for result in results:
                if result.error == "stopped before it finished":
                    result.error = f"stopped before it finished: {outcome.message}"
    return results
