"""The demo: a synthetic cohort generated on the spot and taken through the whole pipeline with
the embedded defaults. It needs no data and no network.

1. A labelled cohort of pyramidal H&E-like slides (half with lesions, their outlines written as
   GeoJSON) is generated into ``OUT/cohort/`` (reused when already there).
2. ``slidepipe run`` tiles the slides and extracts EfficientNet-Lite0 features (``OUT/run/``).
3. ABMIL is trained with patient-level cross-validation on those features (``OUT/model/``) and
   evaluated out of fold, with bootstrap confidence intervals.
4. ``slidepipe run`` again, now with the model: it predicts every slide with the fold ensemble
   and exports heatmaps, the HTML worklist and the run report (tiling and features are reused).
5. Attention is checked against the known lesions: for every positive slide, the attention of
   the fold model that never saw the slide ranks its patches (AUC of lesion vs other patches,
   hit rate of the top patches), and the exported heatmap's regions above the threshold are
   compared with the lesion outlines (IoU).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from shapely.geometry import shape
from shapely.ops import unary_union

from mil.evaluation import roc_auc
from wsi.atomic import write_json_atomic

from .feature_store import open_features
from .mil_report import evaluate_run
from .mil_run import MILRunConfig, load_checkpoint, store_path, train_run
from .run.config import RunConfig
from .run.runner import RunResult, run_archive
from .synthetic import LABEL_NAMES, LESIONS_SUFFIX, make_cohort

DEMO_SLIDES = 16
DEMO_SIZE = 6144
DEMO_SEED = 0
DEMO_FOLDS = 4
#: The demo's ABMIL training (small cohort: a higher learning rate, all instances).
DEMO_TRAINING: dict[str, Any] = {"model": "abmil", "epochs": 30, "patience": 10,
                                 "learning_rate": 1e-3, "max_instances": None, "seed": DEMO_SEED}


@dataclass(frozen=True)
class LesionOverlap:
    """How well attention finds the lesions of one positive slide."""

    slide_id: str
    lesion_patches: int
    patch_auc: float
    top_hit_rate: float
    region_iou: float | None


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put its outputs and what it measured."""

    run: RunResult
    model_dir: Path
    metrics: dict[str, Any]
    overlaps: list[LesionOverlap]


def generate_demo_cohort(out: Path, n_slides: int = DEMO_SLIDES,
                         size: tuple[int, int] = (DEMO_SIZE, DEMO_SIZE)) -> Path:
    """Write the demo's slides into ``out/cohort`` (reused when already there) and return its
    labels CSV, which doubles as the manifest of the run."""
    folder = out / "cohort"
    labels, stamp = folder / "labels.csv", folder / "cohort.json"
    wanted = {"n_slides": n_slides, "size": list(size), "seed": DEMO_SEED,
              "labels": list(LABEL_NAMES)}
    if labels.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return labels
    labels = make_cohort(folder, n_slides, size=size, seed=DEMO_SEED)
    write_json_atomic(stamp, wanted)
    return labels


def _run_config(labels: Path, out: Path, settings: dict[str, Any], **run: Any) -> RunConfig:
    return RunConfig.model_validate({"archive": [labels], "out": out, **settings, **run})


def run_demo(out: Path, n_slides: int = DEMO_SLIDES, size: int = DEMO_SIZE,
             settings: dict[str, Any] | None = None, folds: int = DEMO_FOLDS,
             say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into ``out`` (see the module docstring). ``settings`` holds slidepipe
    config sections (``cluster:``, ``backbone:``…) for both runs."""
    settings = settings or {}
    say(f"1/5 generating {n_slides} synthetic slides of {size} x {size} px in {out / 'cohort'}")
    labels = generate_demo_cohort(out, n_slides, (size, size))
    run_dir, model_dir = out / "run", out / "model"
    say(f"2/5 slidepipe run: tissue, patch grids and features into {run_dir}")
    extraction = _run_config(labels, run_dir, settings, stages=["tile", "extract"])
    features = run_archive(extraction, say=say)
    say(features.summary)
    if features.exit_code != 0:
        raise RuntimeError(f"feature extraction failed: {features.summary}")
    say(f"3/5 training ABMIL with {folds}-fold patient-level cross-validation into {model_dir}")
    backbone = extraction.backbone.name
    mil = MILRunConfig.model_validate({
        "labels": labels, "features": run_dir / "slides", "backbone": backbone,
        "label_names": list(LABEL_NAMES), "cv": {"folds": folds, "seed": DEMO_SEED},
        "train": DEMO_TRAINING, "evaluation": {"n_bootstrap": 500}})
    if _trained(model_dir, mil):
        say(f"    (the model in {model_dir} was trained with these settings; reused)")
        metrics = json.loads((model_dir / "metrics.json").read_text())
    else:
        train_run(mil, model_dir)
        metrics = evaluate_run(model_dir)
    say("4/5 slidepipe run with the model: predictions, heatmaps, worklist and report")
    result = run_archive(_run_config(labels, run_dir, settings, model=[model_dir]), say=say)
    say("5/5 attention against the known lesions")
    overlaps = lesion_overlaps(labels, model_dir, run_dir, backbone)
    return DemoResult(result, model_dir, metrics, overlaps)


def _trained(model_dir: Path, config: MILRunConfig) -> bool:
    """Whether ``model_dir`` holds a finished, evaluated run of ``config``."""
    try:
        saved = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (saved == config.model_dump(mode="json")
            and (model_dir / "metrics.json").is_file()
            and (model_dir / "report.txt").is_file())


def lesion_overlaps(labels: Path, model_dir: Path, run_dir: Path, backbone: str
                    ) -> list[LesionOverlap]:
    """:class:`LesionOverlap` of every slide with a lesion GeoJSON beside it in the cohort,
    scored by the attention of the fold model that held the slide out."""
    test_fold = _test_folds(model_dir / "predictions_oof.csv")
    overlaps = []
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        lesions_file = labels.parent / f"{row['slide_id']}{LESIONS_SUFFIX}"
        if not lesions_file.exists():
            continue
        model, _, _ = load_checkpoint(model_dir / f"fold_{test_fold[row['slide_id']]}"
                                      / "model.pt")
        overlaps.append(lesion_overlap(
            row["slide_id"], store_path(run_dir / "slides", backbone, row["slide_id"]),
            model, lesions_file,
            run_dir / "heatmaps" / row["slide_id"] / "heatmap.geojson"))
    return overlaps


def _test_folds(oof_csv: Path) -> dict[str, int]:
    with open(oof_csv, newline="") as handle:
        return {r["case_id"]: int(r["fold"]) for r in csv.DictReader(handle)
                if r["split"] == "test"}


def _polygons(geojson: Path, object_type: str | None = None) -> shapely.Geometry:
    features = json.loads(geojson.read_text())["features"]
    return unary_union([shape(f["geometry"]) for f in features
                        if object_type is None
                        or f["properties"].get("objectType") == object_type])


def lesion_overlap(slide_id: str, store: Path, model: torch.nn.Module, lesions_file: Path,
                   heatmap_geojson: Path) -> LesionOverlap:
    """Score ``model``'s attention on ``store`` against the lesion outlines: a patch is a
    lesion patch when its centre lies inside a lesion. ``region_iou`` compares the heatmap's
    threshold regions (when exported) with the lesions."""
    features = open_features(store)
    coords = features.coords.astype(np.float64)
    side = float(features.attrs["grid"]["patch_size_level0"])
    lesions = _polygons(lesions_file)
    inside = shapely.contains_xy(lesions, coords[:, 0] + side / 2, coords[:, 1] + side / 2)
    with torch.inference_mode():
        _, attention = model.predict(torch.from_numpy(features.features())[None])
    scores = attention[0].float().numpy().reshape(-1, len(coords))[-1]
    n_lesion = int(inside.sum())
    top = np.argsort(-scores, kind="stable")[:max(n_lesion, 1)]
    iou = None
    if heatmap_geojson.exists():
        regions = _polygons(heatmap_geojson, "annotation")
        union = regions.union(lesions).area
        iou = float(regions.intersection(lesions).area / union) if union else 0.0
    return LesionOverlap(slide_id, n_lesion,
                         roc_auc(inside, scores) if 0 < n_lesion < len(coords) else float("nan"),
                         float(inside[top].mean()), iou)
