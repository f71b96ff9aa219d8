"""Radiology studies in ``slidepipe run``: found in the archive beside the slides, recorded in
the run database as slides are, and run through the same four stages on the same graph.

* **identity**: a study's hash is ``rad1-`` and a SHA-256 over the sorted SHA-256s of its files'
  bytes (a copy or renamed files are the same study); its id is its keyed pseudonym
  (``study-<12 hex>``, the id ``slidepipe radiology extract`` gives it). The database keeps its
  path (the series' folder or the file) and its files' signature (names, sizes, mtimes) as it
  keeps a slide's, and nothing else about it; a rerun reuses the hash of a path whose signature
  is unchanged instead of reading every file again.
* **tile** reads the study and builds its bag; **extract** embeds it into
  ``OUT/slides/<study_id>/features_<backbone>.zarr`` (both :class:`StudyExtraction`);
  **predict** is the slides' own; **export** writes :func:`~pipelines.radiology.exports.
  export_study`'s files and a ``summary.json`` into ``OUT/heatmaps/<study_id>/``. Studies are
  not in the HTML worklist (it shows whole slides in deep-zoom viewers); the report lists them.
* ``--only`` matches a study's id, path and file names; ``--since`` its files' times.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from wsi.atomic import write_json_atomic
from wsi.fingerprint import file_sha256

from ..discovery import SlideEntry
from ..extract_worker import store_path
from ..feature_store import open_features
from ..radiology import RadiologyConfig, RadiologyError, StudyInput, StudyKeys, read_study
from ..radiology.exports import export_study, study_attention
from ..radiology.extract import RadiologySetup, StudyExtraction
from ..radiology.studies import discover_studies, study_identity
from .database import PathRow
from .inventory import UNREADABLE_PREFIX, ArchiveSlide, Inventory, files_signature
from .plan import HEATMAP_SUMMARY, HEATMAPS_DIR, PREDICTION_NAME, KeyInputs, key_digest, later_keys
from .slides import RunSlide
from .steps import FINISHING, Next, StageOutcome, Step, Task

STUDY_HASH_PREFIX = "rad1-"
#: Sections of the radiology configuration that shape a study's bag.
BAG_SECTIONS = ("modality", "window", "volume", "image")


def is_study(slide_hash: str) -> bool:
    """Whether a run database hash is a radiology study's."""
    return slide_hash.startswith(STUDY_HASH_PREFIX)


def study_hash(study: StudyInput) -> str:
    """The study's content hash (see the module docstring)."""
    digests = sorted(file_sha256(path) for path in study.files)
    return STUDY_HASH_PREFIX + hashlib.sha256("".join(digests).encode()).hexdigest()[:32]


@dataclass
class StudyInventory:
    """The archive's studies as the run's :class:`ArchiveSlide` rows, with their inputs by
    hash, and the counts the report adds to the slides'."""

    slides: list[ArchiveSlide]
    inputs: dict[str, StudyInput]
    found: int = 0
    duplicates: int = 0
    filtered_out: int = 0

    def add_to(self, inventory: Inventory) -> None:
        """Add the studies and their counts to the slides' inventory."""
        inventory.slides += self.slides
        inventory.found += self.found
        inventory.duplicates += self.duplicates
        inventory.filtered_out += self.filtered_out


def _known_hash(study: StudyInput, signature: str, known_paths: dict[str, PathRow]
                ) -> str | None:
    """The hash recorded for the study's path when its files' signature is unchanged."""
    known = known_paths.get(os.path.abspath(study.label))
    if known is None or known.signature != signature or not is_study(known.slide_hash):
        return None
    return known.slide_hash


def take_study_inventory(paths: Sequence[Path], keys: StudyKeys,
                         known_paths: dict[str, PathRow] | None = None, *,
                         only: Sequence[str] = (),
                         since: datetime | None = None) -> StudyInventory:
    """Group the radiology inputs into studies, identify and deduplicate them; a study that
    cannot be read is kept with its error (it fails its tile stage). ``known_paths`` (the run
    database's) lets a study whose files are unchanged keep its hash without being re-read."""
    studies = discover_studies(paths)
    inventory = StudyInventory([], {}, found=len(studies))
    groups: dict[str, list[tuple[StudyInput, str, float, str, str]]] = {}
    for study in studies:
        try:
            study_id = keys.study_id(study_identity(study))
            signature, modified = files_signature(study.files)
            slide_hash = _known_hash(study, signature, known_paths or {}) or study_hash(study)
            error = ""
        except (RadiologyError, OSError) as problem:
            study_id = keys.study_id(f"unreadable:{study.label}")
            slide_hash = UNREADABLE_PREFIX + hashlib.sha256(study.label.encode()).hexdigest()[:16]
            signature, modified, error = "", 0.0, str(problem)
        names = {study_id, study.label, *(path.name for path in study.files)}
        if only and not any(fnmatch.fnmatchcase(name, pattern)
                            for pattern in only for name in names):
            inventory.filtered_out += 1
            continue
        if since is not None and not error and modified < since.timestamp():
            inventory.filtered_out += 1
            continue
        groups.setdefault(slide_hash, []).append((study, study_id, modified, signature, error))
    for slide_hash, items in groups.items():
        study, study_id, _, _, error = items[0]
        inventory.duplicates += len(items) - 1
        inventory.inputs[slide_hash] = study
        inventory.slides.append(ArchiveSlide(
            slide_hash=slide_hash, entry=SlideEntry(path=Path(study.label), slide_id=study_id),
            paths=tuple(os.path.abspath(item[0].label) for item in items),
            modified=max(item[2] for item in items),
            signatures=tuple(item[3] for item in items), error=error))
    return inventory


def study_stage_keys(slide: ArchiveSlide, setup: RadiologySetup,
                     inputs: KeyInputs) -> dict[str, str]:
    """Every stage's key for a study: its content and bag settings, then the backbone."""
    resolved = setup.config.resolved()
    tile = key_digest({"study": slide.slide_hash,
                       "bag": {name: resolved[name] for name in BAG_SECTIONS}})
    extract = key_digest({"tile": tile, "backbone": setup.backbone.name,
                          "weights": setup.backbone.weights_hash,
                          "dtype": setup.config.dtype})
    return {"tile": tile, "extract": extract, **later_keys(extract, inputs)}


def study_output_checks(out: Path, setup: RadiologySetup) -> dict[str, Callable[[str], bool]]:
    """Per stage, whether a study's output is on disk. The bag is handed from the tile to the
    extract task and then removed, so the tile stage has no lasting output of its own."""

    def extracted(study_id: str) -> bool:
        store = store_path(setup.out, study_id, setup.backbone.name)
        return (store / "_progress" / "COMPLETE.json").is_file()

    return {"tile": lambda _: True, "extract": extracted,
            "predict": lambda study_id: (setup.out / study_id / PREDICTION_NAME).is_file(),
            "export": lambda study_id: (out / HEATMAPS_DIR / study_id /
                                        HEATMAP_SUMMARY).is_file()}


@dataclass(frozen=True)
class StudyExportJob:
    """One predicted study to export."""

    study: StudyInput
    config: RadiologyConfig
    keys: StudyKeys
    store: str
    prediction: dict[str, Any]
    folder: str
    top_k: int


def export_study_heatmaps(job: StudyExportJob) -> dict[str, Any]:
    """Write the study's attention exports and ``summary.json`` (runs on a worker)."""
    volume = read_study(job.study, job.config, job.keys)
    store = open_features(job.store)
    classes = list(job.prediction["probabilities"])
    attention = study_attention(store, job.prediction["attention"],
                                classes.index(job.prediction["predicted"]))
    folder = Path(job.folder)
    paths = export_study(volume, store, attention, folder, job.config.window, job.top_k)
    exports = [path.name for path in paths]
    write_json_atomic(folder / HEATMAP_SUMMARY, {"study_id": volume.study_id,
                                                 "exports": exports, "patches": len(store)})
    return {"folder": job.folder, "exports": exports, "patches": len(store)}


class RunStudy(RunSlide):
    """A study's chain through a run: :class:`StudyExtraction`, then the slides' predict
    stage and the study's own exports."""

    def __init__(self, *args: Any, study: StudyInput, radiology: RadiologySetup,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.study = study
        self.radiology = radiology
        self.bagging: StudyExtraction | None = None

    def start(self) -> Next:
        """The first step of the plan's stages."""
        feature_stages = tuple(s for s in self.plan.todo if s in ("tile", "extract"))
        if not feature_stages:
            return self._after_features()
        self.bagging = StudyExtraction(self.study, self.radiology, stages=feature_stages,
                                       after=self._after_bag)
        return self.bagging.start()

    def _after_bag(self) -> Next:
        assert self.bagging is not None and self.bagging.prepared is not None
        self.patches = self.bagging.prepared.instances
        return self._after_features()

    def _export_step(self) -> Step:
        if self.prediction is None:
            raise ValueError(f"{self.plan.slide.slide_id} has no recorded prediction to export;"
                             " run the predict stage on it")
        study_id = self.plan.slide.slide_id
        job = StudyExportJob(study=self.study, config=self.radiology.config,
                             keys=self.radiology.keys,
                             store=str(store_path(self.radiology.out, study_id,
                                                  self.radiology.backbone.name)),
                             prediction=self.prediction,
                             folder=str(self.setup.out / HEATMAPS_DIR / study_id),
                             top_k=self.setup.config.heatmap.top_k)
        return Step("export", [Task(export_study_heatmaps, job, "cpu", "export", FINISHING)],
                    lambda results: Next([StageOutcome("export", "done", results[0])]))
