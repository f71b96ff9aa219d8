"""Radiology studies → bags → features in ordinary slidepipe feature stores, as one Dask graph.

Each study found in the inputs (see :func:`~.studies.discover_studies`) goes through two tasks
(:mod:`.worker`): reading it and building its bag on any worker, then embedding the bag and
writing ``OUT/<study_id>/features_<backbone>.zarr`` on a model worker (the ``MODEL`` resource),
with the same backbone registry, per-worker model cache and feature store writer as the
slides. :class:`StudyExtraction` is that chain for one study, run by the engine of
:mod:`pipelines.run.flow` together with every other study's (and, in ``slidepipe run``, every
slide's), on a LocalCluster or an existing cluster (``cluster.scheduler``). ``slidepipe
extract``, ``slidepipe radiology extract`` and ``slidepipe run`` share it. A study that fails
is recorded with its reason and the others go on; a complete store with the same key is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import load_backbone
from ..cluster import dask_client, default_torch_threads, default_workers
from ..extract_worker import BackboneIdentity
from ..run.flow import ArchiveFlow
from ..run.steps import (
    EMBEDDING,
    STARTING,
    Failure,
    Next,
    SlideWork,
    StageOutcome,
    Step,
    Task,
    continue_after,
)
from .config import RadiologyConfig
from .keys import StudyKeys
from .studies import StudyInput
from .worker import EmbedJob, PreparedStudy, StudyJob, embed_study, prepare_study

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """One row of the radiology summary (no PHI: the pseudonym, never the input's name)."""

    study_id: str
    modality: str = ""
    kind: str = ""
    status: str = "failed"  # ok, cached, empty, failed
    instances: int = 0
    seconds: float = 0.0
    store: str = ""
    error: str = ""


@dataclass(frozen=True)
class RadiologySetup:
    """What every study of an extraction shares: the configuration, the output folder
    (studies go to ``out/<study_id>/``), the pseudonym keys and the backbone's identity."""

    config: RadiologyConfig
    out: Path
    keys: StudyKeys
    backbone: BackboneIdentity
    torch_threads: int
    overwrite: bool = False

    @classmethod
    def create(cls, config: RadiologyConfig, out: Path, keys: StudyKeys,
               overwrite: bool = False) -> RadiologySetup:
        """Load the backbone once, on the CPU, for its identity; the workers load their own.
        Raises ``BackboneError`` when it cannot be loaded."""
        backbone = load_backbone(config.backbone.model_copy(update={"device": "cpu",
                                                                    "compile": False}))
        threads = default_torch_threads(config.cluster, default_workers(config.cluster))
        return cls(config=config, out=Path(out), keys=keys,
                   backbone=BackboneIdentity.of(backbone), torch_threads=threads,
                   overwrite=overwrite)


def features_detail(prepared: PreparedStudy, cached: bool) -> dict[str, Any]:
    """What the extract stage reports about a study (the keys slides report too)."""
    return {"patches": prepared.instances, "cached": cached, "store": prepared.store,
            "no_tissue": prepared.instances == 0, "study_id": prepared.study_id,
            "modality": prepared.modality, "kind": prepared.kind}


class StudyExtraction:
    """The client-side chain of one study: read and bag it (the ``tile`` stage when
    ``stages`` has it, else part of ``extract``), then embed it; ``after`` continues the chain
    once the features are complete."""

    def __init__(self, study: StudyInput, setup: RadiologySetup,
                 stages: tuple[str, ...] = ("tile", "extract"),
                 after: Callable[[], Next] | None = None) -> None:
        self.study = study
        self.setup = setup
        self.stages = stages
        self.after = after
        self.prepared: PreparedStudy | None = None

    def start(self) -> Next:
        """The first step: read the study and build its bag."""
        setup = self.setup
        job = StudyJob(study=self.study, config=setup.config, keys=setup.keys,
                       out=str(setup.out), backbone=setup.backbone, overwrite=setup.overwrite)
        stage = "tile" if "tile" in self.stages else "extract"
        return Next(step=Step(stage, [Task(prepare_study, job, "cpu", "bag", STARTING)],
                              self._prepared))

    def _prepared(self, results: list[Any]) -> Next:
        prepared: PreparedStudy = results[0]
        self.prepared = prepared
        finished = []
        if "tile" in self.stages:
            finished.append(StageOutcome("tile", "done", {
                "patches": prepared.instances, "no_tissue": prepared.instances == 0,
                "modality": prepared.modality, "kind": prepared.kind}))
        if "extract" not in self.stages:
            return continue_after(finished, self.after)
        if not prepared.bag_file:
            finished.append(StageOutcome("extract", "done",
                                         features_detail(prepared, prepared.cached)))
            return continue_after(finished, self.after)
        config = self.setup.config
        assert prepared.attributes is not None
        job = EmbedJob(bag_file=prepared.bag_file, store=prepared.store, key=prepared.key,
                       attributes=prepared.attributes,
                       backbone=config.backbone.model_dump(mode="json"),
                       torch_threads=self.setup.torch_threads, chunk_rows=config.chunk_rows,
                       dtype=config.dtype, overwrite=self.setup.overwrite)
        return Next(finished, Step("extract", [Task(embed_study, job, "model", "embed",
                                                    EMBEDDING)], self._embedded))

    def _embedded(self, results: list[Any]) -> Next:
        assert self.prepared is not None
        return continue_after([StageOutcome("extract", "done",
                                            features_detail(self.prepared, False))], self.after)


class _StudyEvents:
    """Fills one :class:`StudyResult` as the study goes through the engine."""

    def __init__(self, study: StudyInput, result: StudyResult,
                 on_study: Callable[[StudyResult], None] | None) -> None:
        self.study = study
        self.result = result
        self.on_study = on_study
        self.started = time.perf_counter()

    def _done(self) -> None:
        self.result.seconds = round(time.perf_counter() - self.started, 3)
        if self.on_study is not None:
            self.on_study(self.result)

    def stage_started(self, stage: str) -> None:
        """Nothing to record: the study's clock runs from its admission."""

    def stage_finished(self, outcome: StageOutcome, seconds: float) -> None:
        detail, result = outcome.detail, self.result
        result.study_id, result.store = detail["study_id"], detail["store"]
        result.modality, result.kind = detail["modality"], detail["kind"]
        result.instances = detail["patches"]
        if detail["no_tissue"]:
            result.status, result.error = "empty", "no foreground patch in the image"
        else:
            result.status = "cached" if detail["cached"] else "ok"
        self._done()

    def stage_failed(self, stage: str, failure: Failure, seconds: float) -> None:
        self.result.error = f"{self.study.label}: {failure.message}"
        self._done()

    def stage_interrupted(self, stage: str) -> None:
        self.result.error = f"{self.study.label}: stopped before it finished"
        self._done()


def extract_studies(studies: list[StudyInput], config: RadiologyConfig, out: Path,
                    keys: StudyKeys, on_study: Callable[[StudyResult], None] | None = None,
                    overwrite: bool = False,
                    announce: Callable[[str], None] = log.info) -> list[StudyResult]:
    """Extract every study's features into ``out`` as one Dask graph on ``config.cluster``;
    never raises for one bad study. Results are in the order of ``studies``; ``on_study``
    hears each as it ends, ``announce`` the line naming the cluster."""
    setup = RadiologySetup.create(config, out, keys, overwrite)
    results = [StudyResult(study_id="") for _ in studies]
    works = [SlideWork(f"input{index:05d}", StudyExtraction(study, setup, ("extract",)).start,
                       _StudyEvents(study, result, on_study))
             for index, (study, result) in enumerate(zip(studies, results, strict=True))]
    if works:
        with dask_client(config.cluster, announce) as client:
            ArchiveFlow(client).run(works)
    return results
