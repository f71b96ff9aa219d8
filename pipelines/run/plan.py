"""What each slide needs tonight: the stages to (re)do, decided from the run database.

Every stage output is identified by a *key*: a hash of the slide's content and of every setting
that shapes that output, chained so a change upstream changes every key after it::

    tile     slide hash, grid settings (slides, tissue, tiling, qc), the µm/px given for it
    extract  the features key (slide hash, backbone and weights, grid, stain, dtype) and the
             CLAM/TRIDENT export switches
    predict  extract key, model (ensemble) hash
    export   predict key, heatmap settings

A stage is skipped when the database has it ``done`` (or ``skipped``) under the same key and
its output is still on disk. A slide that failed (or was quarantined) under the same key is
left alone unless ``retry_failed``; under another key (the slide or the settings changed) it
is tried again. The first stage to redo and every stage after it are queued.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..extract import ExtractionSetup, features_key
from ..tile import GRID_SECTIONS, given_mpp
from .config import STAGES
from .database import StageRow
from .inventory import ArchiveSlide

PREDICTION_NAME = "prediction.csv"
HEATMAPS_DIR = "heatmaps"
HEATMAP_SUMMARY = "summary.json"


def key_digest(parts: Mapping[str, Any]) -> str:
    """A stage key: 32 hex digits of the SHA-256 of ``parts`` as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                          ).hexdigest()[:32]


@dataclass(frozen=True)
class KeyInputs:
    """The run-wide settings the keys depend on."""

    extraction: ExtractionSetup
    model_hash: str | None
    heatmap: dict[str, Any]


def stage_keys(slide: ArchiveSlide, inputs: KeyInputs) -> dict[str, str]:
    """The key of every stage's output for this slide (see the module docstring)."""
    setup = inputs.extraction
    config = setup.config
    resolved = config.resolved()
    tile = key_digest({"slide": slide.slide_hash,
                       "grid": {s: resolved[s] for s in GRID_SECTIONS},
                       "mpp": given_mpp(slide.entry, config, setup.mpp_overrides)})
    extract = key_digest({"tile": tile,
                          "features": features_key(slide.slide_hash, setup.backbone, config),
                          "exports": [config.extraction.export_hdf5,
                                      config.extraction.export_pt]})
    return {"tile": tile, "extract": extract, **later_keys(extract, inputs)}


def later_keys(extract: str, inputs: KeyInputs) -> dict[str, str]:
    """The predict and export keys that follow from an extract key."""
    predict = key_digest({"extract": extract, "model": inputs.model_hash})
    return {"predict": predict, "export": key_digest({"predict": predict,
                                                      "heatmap": inputs.heatmap})}


@dataclass(frozen=True)
class SlidePlan:
    """A slide with the stages to run tonight (``todo``) and every stage's key."""

    slide: ArchiveSlide
    todo: tuple[str, ...]
    keys: dict[str, str]


@dataclass(frozen=True)
class PlanDecision:
    """What the planner decided for one slide: a plan, or why there is nothing to do
    (``up_to_date`` or ``failed_before``)."""

    plan: SlidePlan | None
    reason: str = ""


def output_checks(out: Path, setup: ExtractionSetup) -> dict[str, Callable[[str], bool]]:
    """Per stage, whether a slide's output is on disk (cheap checks, no content read)."""
    slides = setup.out

    def tiled(slide_id: str) -> bool:
        return (slides / slide_id / "provenance.json").is_file()

    def extracted(slide_id: str) -> bool:
        complete = setup.store(slide_id) / "_progress" / "COMPLETE.json"
        return complete.is_file() and all(p.is_file() for p in setup.exports(slide_id))

    def predicted(slide_id: str) -> bool:
        return (slides / slide_id / PREDICTION_NAME).is_file()

    def exported(slide_id: str) -> bool:
        return (out / HEATMAPS_DIR / slide_id / HEATMAP_SUMMARY).is_file()

    return {"tile": tiled, "extract": extracted, "predict": predicted, "export": exported}


def decide(slide: ArchiveSlide, keys: dict[str, str], rows: Mapping[str, StageRow],
           stages: Sequence[str], present: Mapping[str, Callable[[str], bool]],
           retry_failed: bool) -> PlanDecision:
    """The stages this slide needs (see the module docstring)."""
    for index, stage in enumerate(stages):
        row = rows.get(stage)
        same_key = row is not None and row.key == keys[stage]
        if same_key and row.status == "skipped":
            continue
        if same_key and row.status == "done" and present[stage](slide.slide_id):
            continue
        if same_key and row.status in ("failed", "quarantined") and not retry_failed:
            return PlanDecision(None, "failed_before")
        return PlanDecision(SlidePlan(slide, tuple(stages[index:]), keys))
    return PlanDecision(None, "up_to_date")


def unreadable_plan(slide: ArchiveSlide, rows: Mapping[str, StageRow],
                    retry_failed: bool) -> PlanDecision:
    """A slide whose files cannot be read fails its tile stage (once, unless retried)."""
    row = rows.get(STAGES[0])
    if row is not None and row.status == "failed" and not retry_failed:
        return PlanDecision(None, "failed_before")
    return PlanDecision(SlidePlan(slide, (STAGES[0],), {STAGES[0]: "unreadable"}))
