"""One slide's chain through a run: tiling and extraction (:class:`SlideExtraction`, shared
with ``slidepipe extract``), then prediction and heatmap exports, from whichever stage the
plan says to start at. Runs on the client; the work itself is done by worker tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..extract import ExtractionSetup, SlideExtraction
from ..radiology import StudyInput
from ..radiology.extract import RadiologySetup
from ..tile import given_mpp
from .config import RunConfig
from .database import SlideRow
from .export import ExportJob, export_slide_heatmaps, prediction_of
from .plan import HEATMAPS_DIR, PREDICTION_NAME, SlidePlan
from .predict import ModelInfo, PredictJob, predict_slide
from .recorder import SlideRecorder
from .steps import FINISHING, Next, SlideWork, StageOutcome, Step, Task

FEATURE_STAGES = ("tile", "extract")
NO_TISSUE = {"reason": "no tissue"}


@dataclass(frozen=True)
class RunSetup:
    """What every slide of a run shares; with radiology studies in the archive, their setup
    and their inputs by hash."""

    out: Path
    config: RunConfig
    extraction: ExtractionSetup
    model: ModelInfo | None
    radiology: RadiologySetup | None = None
    studies: dict[str, StudyInput] = field(default_factory=dict)


class RunSlide:
    """The chain of one slide (see the module docstring)."""

    def __init__(self, plan: SlidePlan, setup: RunSetup, recorder: SlideRecorder,
                 recorded: SlideRow | None) -> None:
        self.plan = plan
        self.setup = setup
        self.recorder = recorder
        self.patches = recorded.patches if recorded is not None else None
        self.prediction: dict[str, Any] | None = (recorded.prediction if recorded is not None
                                                  else None)
        self.extraction: SlideExtraction | None = None

    def work(self) -> SlideWork:
        """The slide as the engine takes it."""
        return SlideWork(self.plan.slide.slide_id, self.start, self.recorder)

    def start(self) -> Next:
        """The first step of the plan's stages."""
        feature_stages = tuple(s for s in self.plan.todo if s in FEATURE_STAGES)
        if not feature_stages:
            return self._after_features()
        self.extraction = SlideExtraction(self.plan.slide.entry, self.setup.extraction,
                                          stages=feature_stages, after=self._after_features,
                                          on_chunk=self.recorder.chunk_done)
        return self.extraction.start()

    def _after_features(self) -> Next:
        if self.extraction is not None and self.extraction.prepared is not None:
            self.patches = self.extraction.prepared.patches
        todo = self.plan.todo
        later = [stage for stage in ("predict", "export") if stage in todo]
        if not later:
            return Next()
        if self.patches == 0:
            return Next([StageOutcome(stage, "skipped", NO_TISSUE) for stage in later])
        if "predict" in todo:
            return Next(step=self._predict_step())
        return Next(step=self._export_step())

    def _predict_step(self) -> Step:
        assert self.setup.model is not None
        slides = self.setup.extraction.out
        slide_id = self.plan.slide.slide_id
        job = PredictJob(models=self.setup.model.paths, features=str(slides),
                         slide_id=slide_id, out_csv=str(slides / slide_id / PREDICTION_NAME))
        return Step("predict", [Task(predict_slide, job, "cpu", "predict", FINISHING)],
                    self._predicted)

    def _predicted(self, results: list[Any]) -> Next:
        self.prediction = results[0]
        finished = [StageOutcome("predict", "done", results[0])]
        if "export" in self.plan.todo:
            return Next(finished, self._export_step())
        return Next(finished)

    def _export_step(self) -> Step:
        if self.prediction is None:
            raise ValueError(f"{self.plan.slide.slide_id} has no recorded prediction to export;"
                             " run the predict stage on it")
        setup, entry = self.setup, self.plan.slide.entry
        config = setup.config
        job = ExportJob(slide_path=str(entry.path),
                        store=str(setup.extraction.store(entry.slide_id)),
                        prediction=prediction_of(entry.slide_id, self.prediction),
                        folder=str(setup.out / HEATMAPS_DIR / entry.slide_id),
                        settings=config.heatmap, name=entry.slide_id,
                        mpp=given_mpp(entry, setup.extraction.config,
                                      setup.extraction.mpp_overrides),
                        backend=config.slides.backend)
        return Step("export", [Task(export_slide_heatmaps, job, "cpu", "export", FINISHING)],
                    lambda results: Next([StageOutcome("export", "done", results[0])]))
