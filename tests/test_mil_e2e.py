"""MIL end to end: real-tissue slides with known lesions → features → cross-validated
training → evaluation → predictions whose attention points at the lesions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import load_config
from pipelines.discovery import discover_slides
from pipelines.extract import extract_archive
from pipelines.feature_store import open_features
from tests.builders import build_lesion_cohort

runner = CliRunner()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Twelve slides (six with a lesion), their features, and a MIL config."""
    root = tmp_path_factory.mktemp("mil-e2e")
    (root / "slides").mkdir()
    labels, boxes = build_lesion_cohort(root / "slides")
    config = load_config(None, {"extraction": {"chunk_rows": 64},
                                "cluster": {"workers": 1, "dashboard": None}})
    results = extract_archive(discover_slides([labels]), config, root / "features")
    assert all(r.status == "ok" for r in results), results
    mil_config = root / "mil.yaml"
    mil_config.write_text(json.dumps({
        "labels": str(labels), "features": str(root / "features"),
        "backbone": "efficientnet_lite0", "task": "binary",
        "label_names": ["negative", "positive"], "cv": {"folds": 3, "seed": 0},
        "train": {"model": "abmil", "epochs": 30, "patience": 30, "learning_rate": 5e-4,
                  "max_instances": None, "seed": 0},
        "evaluation": {"n_bootstrap": 200, "temperature_scaling": True}}))
    return root, mil_config, boxes


def _train(root: Path, config: Path, name: str, model: str) -> Path:
    run = root / name
    result = runner.invoke(app, ["train", str(config), "--out", str(run), "--model", model])
    assert result.exit_code == 0, result.output
    return run


def test_training_evaluation_prediction_and_attention(cohort: tuple[Path, Path, dict]) -> None:
    root, config, boxes = cohort
    run = _train(root, config, "abmil", "abmil")
    metrics = json.loads((run / "metrics.json").read_text())
    auc = metrics["pooled"]["auc"]
    assert auc["value"] >= 0.9 and auc["low"] <= auc["value"] <= auc["high"]
    assert {"before", "after", "temperature"} <= set(metrics["temperature_scaling"])
    for plot in ("roc.png", "reliability.png", "confusion.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folds = [list(csv.DictReader(p.read_text().splitlines()))
             for p in sorted((run / "folds").glob("*.csv"))]
    test_patients = [{r["patient_id"] for r in fold if r["split"] == "test"} for fold in folds]
    assert sum(len(p) for p in test_patients) == len(set().union(*test_patients)) == 12

    out = root / "predictions.csv"
    result = runner.invoke(app, ["predict", "--model", str(run), "--features",
                                 str(root / "features"), "--out", str(out), *sorted(boxes)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert all(r["predicted"] == "positive" for r in rows)
    inside_top = 0
    for row in rows:
        store_path = root / "features" / row["slide_id"] / "features_efficientnet_lite0.zarr"
        coords = open_features(store_path).coords
        attention = np.asarray(zarr.open_group(store_path, mode="r")[row["attention"]][:])
        x, y, w, h = boxes[row["slide_id"]]
        inside = (coords[:, 0] >= x) & (coords[:, 0] < x + w) & (coords[:, 1] >= y) & (
            coords[:, 1] < y + h)
        assert attention[inside].mean() > 2 * attention[~inside].mean(), row["slide_id"]
        inside_top += bool(inside[np.argmax(attention)])
    assert inside_top >= 5


def test_compare_two_runs(cohort: tuple[Path, Path, dict]) -> None:
    root, config, _ = cohort
    a = root / "abmil" if (root / "abmil").exists() else _train(root, config, "abmil", "abmil")
    b = _train(root, config, "meanpool", "mean_pool")
    result = runner.invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert comparison["cases"] == 12 and "p_value" in comparison


def test_missing_features_are_a_clear_error(cohort: tuple[Path, Path, dict],
                                            tmp_path: Path) -> None:
    _, config, _ = cohort
    data = json.loads(config.read_text())
    data["features"] = str(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(json.dumps(data))
    result = runner.invoke(app, ["train", str(broken), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "run slidepipe extract first" in result.output


def test_leave_one_site_out_with_subgroup_metrics(cohort: tuple[Path, Path, dict],
                                                  tmp_path: Path) -> None:
    """External validation: each site held out once; metrics reported per site."""
    _, config, _ = cohort
    data = json.loads(config.read_text())
    rows = list(csv.DictReader(Path(data["labels"]).read_text().splitlines()))
    for index, row in enumerate(rows):   # two positives and two negatives per site
        row["site"] = "ABC"[(index // 2) % 3]
    labels = tmp_path / "labels_sites.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data.update({"labels": str(labels), "cv": {"mode": "leave_one_site_out", "seed": 0},
                 "evaluation": {"n_bootstrap": 50, "subgroups": ["site"]}})
    data["train"].update({"epochs": 10, "patience": 10})
    loso = tmp_path / "loso.yaml"
    loso.write_text(json.dumps(data))
    run = _train(tmp_path, loso, "loso", "abmil")
    folds = {p.stem: list(csv.DictReader(p.read_text().splitlines()))
             for p in sorted((run / "folds").glob("*.csv"))}
    site_of = {r["slide_id"]: r["site"] for r in rows}
    assert len(folds) == 3
    for fold in folds.values():
        held_out = {site_of[r["slide_id"]] for r in fold if r["split"] == "test"}
        trained = {site_of[r["slide_id"]] for r in fold if r["split"] != "test"}
        assert len(held_out) == 1 and not held_out & trained
    by_site = json.loads((run / "metrics.json").read_text())["subgroups"]["site"]
    assert set(by_site) == {"A", "B", "C"}
    for metrics in by_site.values():
        assert 0.0 <= metrics["auc"]["value"] <= 1.0
        assert metrics["auc"]["low"] <= metrics["auc"]["value"] <= metrics["auc"]["high"]
