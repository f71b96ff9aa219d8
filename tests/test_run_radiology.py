"""`slidepipe run` over an archive of radiology studies: real CT and MR studies (DICOM files, a
DICOM series, a NIfTI volume) and a broken NIfTI go through bag building, features, a small
ABMIL model trained here on the same studies, and attention exports; the broken one fails
alone, a second run processes nothing, and nothing written carries patient identifiers."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from nibabel.testing import data_path
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.feature_store import open_features
from pipelines.mil_run import load_mil_config, train_run
from pipelines.radiology import (
    RadiologyConfig,
    StudyKeys,
    discover_studies,
    extract_studies,
)
from pipelines.run import studies as run_studies
from tests.test_radiology_e2e import IDENTIFIERS
from tests.test_radiology_readers import real, write_series

runner = CliRunner()
CLUSTER = {"workers": 1, "torch_threads": 1, "dashboard": None}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real studies (three CT, three MR) and a file that is not a volume."""
    root = tmp_path_factory.mktemp("radiology-archive")
    for name in ("CT_small.dcm", "693_UNCR.dcm", "MR_small.dcm", "MR2_UNCR.dcm"):
        shutil.copy(real(name), root / name)
    write_series(root / "ct_series", 4, order=[2, 0, 3, 1])
    shutil.copy(Path(data_path) / "anatomical.nii", root / "anatomical.nii")
    (root / "broken.nii.gz").write_bytes(b"not a volume")
    return root


@pytest.fixture(scope="module")
def model(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ABMIL (CT vs MR) trained on the good studies' features, made with the run's defaults."""
    root = tmp_path_factory.mktemp("radiology-model")
    studies = [s for s in discover_studies([archive]) if "broken" not in s.label]
    config = RadiologyConfig.model_validate({"cluster": CLUSTER})
    results = extract_studies(studies, config, root / "features",
                              StudyKeys.from_file(root / "training.key"))
    assert [r.status for r in results] == ["ok"] * 6, results
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label"])
        writer.writerows([r.study_id, f"p{i}", r.modality.lower()]
                         for i, r in enumerate(results))
    (root / "mil.yaml").write_text(json.dumps({
        "labels": str(root / "labels.csv"), "features": str(root / "features"),
        "task": "binary", "label_names": ["ct", "mr"], "cv": {"folds": 3, "seed": 0},
        "train": {"model": "abmil", "epochs": 6, "patience": 6, "max_instances": None,
                  "seed": 0},
        "evaluation": {"n_bootstrap": 10}}))
    train_run(load_mil_config(root / "mil.yaml"), root / "abmil")
    return root / "abmil"


def _stages(out: Path) -> dict[tuple[str, str], str]:
    with sqlite3.connect(out / "run.db") as connection:
        rows = connection.execute("SELECT s.slide_id, t.stage, t.status FROM stages t "
                                  "JOIN slides s USING (slide_hash)").fetchall()
    return {(study, stage): status for study, stage, status in rows}


def test_studies_run_through_every_stage_and_a_rerun_does_nothing(
        archive: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"archive": [str(archive)], "model": str(model),
                                  "out": str(out), "cluster": CLUSTER,
                                  "heatmap": {"top_k": 2}}))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output

    stages = _stages(out)
    studies = {study for study, _ in stages}
    assert len(studies) == 7 and all(s.startswith("study-") for s in studies)
    failed = [s for s in studies if stages[(s, "tile")] == "failed"]
    assert len(failed) == 1 and (failed[0], "extract") not in stages
    good = studies - set(failed)
    for study in good:
        assert {stages[(study, s)] for s in ("tile", "extract", "predict", "export")} \
            == {"done"}, study
        assert (out / "slides" / study / "features_efficientnet_lite0.zarr").is_dir()
        assert not (out / "slides" / study / "bag.npz").exists()
        summary = json.loads((out / "heatmaps" / study / "summary.json").read_text())
        assert "slice_attention.png" in summary["exports"]
    with open(out / "predictions.csv", newline="") as handle:
        predictions = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert set(predictions) == good
    modalities = {open_features(out / "slides" / s / "features_efficientnet_lite0.zarr"
                                ).attrs["radiology"]["modality"] for s in good}
    assert modalities == {"CT", "MR"}
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["done"] == 6 and report["totals"]["failed"] == 1
    assert "broken.nii.gz" in report["failures"][0]["error"]
    assert (tmp_path / "out-radiology.key").is_file()

    uids = {str(pydicom.dcmread(p).StudyInstanceUID) for p in archive.glob("*.dcm")}
    for path in out.rglob("*"):  # database, logs, report, stores, exports
        if path.is_file():
            data = path.read_bytes()
            assert not any(word.encode() in data for word in (*IDENTIFIERS, *uids)), path

    def rehashed(study: object) -> str:
        raise AssertionError(f"{study}: files unchanged since the last run, hashed again")

    monkeypatch.setattr(run_studies, "study_hash", rehashed)
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0, again.output
    assert "0 slides processed" in again.output and "1 failed before" in again.output
