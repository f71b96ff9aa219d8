"""The demo behind README's first command: the whole pipeline on a generated cohort."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

#: Six small slides and three folds: the whole demo in about a minute.
SMALL = ["--slides", "6", "--size", "3072", "--folds", "3"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_runs_every_stage(small_demo: tuple[Path, str]) -> None:
    out, output = small_demo
    with open(out / "cohort" / "labels.csv", newline="") as handle:
        labels = {r["slide_id"]: r["label"] for r in csv.DictReader(handle)}
    assert len(labels) == 6 and sorted(labels.values()) == ["negative"] * 3 + ["positive"] * 3
    with open(out / "run" / "predictions.csv", newline="") as handle:
        predictions = {r["slide_id"]: r for r in csv.DictReader(handle)}
    assert predictions.keys() == labels.keys()
    for slide_id in labels:
        assert (out / "run" / "slides" / slide_id / "features_efficientnet_lite0.zarr"
                / "_progress" / "COMPLETE.json").exists()
        heatmaps = out / "run" / "heatmaps" / slide_id
        for name in ("overlay.png", "heatmap.tiff", "heatmap.geojson", "summary.json"):
            assert (heatmaps / name).exists(), heatmaps / name
    assert len(list((out / "model").glob("fold_*/model.pt"))) == 3
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["cases"] == 6 and 0.0 <= metrics["pooled"]["auc"]["value"] <= 1.0
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["totals"]["done"] == 6 and report["totals"]["failed"] == 0
    assert list((out / "run" / "worklists").glob("run-*/index.html"))
    # the printed results: out-of-fold metrics and one overlap row per positive slide
    assert "out-of-fold" in output and "auc" in output
    rows = [line for line in output.splitlines() if line.strip("│ ").startswith("synth_")]
    assert len(rows) == 3


def test_demo_finds_the_lesions(small_demo: tuple[Path, str]) -> None:
    """Attention of each held-out fold model ranks lesion patches above the others."""
    from pipelines.demo import lesion_overlaps

    out, _ = small_demo
    overlaps = lesion_overlaps(out / "cohort" / "labels.csv", out / "model", out / "run",
                               "efficientnet_lite0")
    assert len(overlaps) == 3 and all(o.lesion_patches > 0 for o in overlaps)
    aucs = [o.patch_auc for o in overlaps if not math.isnan(o.patch_auc)]
    print("patch AUCs", aucs, "IoUs", [o.region_iou for o in overlaps])
    assert sum(aucs) / len(aucs) >= 0.8


def test_demo_rerun_reuses_everything(small_demo: tuple[Path, str]) -> None:
    out, _ = small_demo
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert result.output.count("0 slides processed") == 2
    assert "reused" in result.output
