"""Radiology end to end through the same commands as the slides: real CT/MR studies (DICOM
and NIfTI) → ``slidepipe radiology extract`` (on Dask, the same features as in-process) →
``slidepipe train`` (ABMIL) → ``predict`` → ``slidepipe radiology heatmap``; a radiograph's
patch attention as an overlay; ``slidepipe extract`` telling studies from slides. Nothing
written carries the patients' identifiers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from PIL import Image
from typer.testing import CliRunner

from pipelines.backbones import load_backbone
from pipelines.cli import app
from pipelines.discovery import discover_inputs
from pipelines.feature_store import open_features
from pipelines.inference import Embedder
from pipelines.mil_run import write_attention
from pipelines.radiology import (
    StudyKeys,
    build_bag,
    find_dicom_studies,
    load_radiology_config,
    read_dicom_study,
    read_nifti,
)
from pipelines.radiology.exports import export_study
from tests.test_radiology_readers import real, write_series

runner = CliRunner()
EXAMPLE_CONFIG = Path(__file__).parents[1] / "configs/radiology.example.yaml"
IDENTIFIERS = ("CompressedSamples", "CQ500", "1CT1", "4MR1", "9RG1")


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six real studies (three CT, three MR), their features and their labels."""
    root = tmp_path_factory.mktemp("radiology-e2e")
    inputs = root / "inputs"
    inputs.mkdir()
    for name in ("CT_small.dcm", "693_UNCR.dcm", "MR_small.dcm", "MR2_UNCR.dcm"):
        shutil.copy(real(name), inputs / name)
    write_series(inputs / "ct_series", 4, order=[2, 0, 3, 1])
    shutil.copy(Path(data_path) / "anatomical.nii", inputs / "anatomical.nii")
    features = root / "features"
    _invoke("radiology", "extract", str(inputs), "--out", str(features),
            "--config", str(Path(__file__).parents[1] / "configs/radiology.example.yaml"))
    rows = list(csv.DictReader((features / "radiology_summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok"] * 6
    labels = root / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label"])
        for index, row in enumerate(rows):
            writer.writerow([row["study_id"], f"p{index}", row["modality"].lower()])
    config = root / "mil.yaml"
    config.write_text(json.dumps({
        "labels": str(labels), "features": str(features), "task": "binary",
        "label_names": ["ct", "mr"], "cv": {"folds": 3, "seed": 0},
        "train": {"model": "abmil", "epochs": 15, "patience": 15, "learning_rate": 1e-3,
                  "max_instances": None, "seed": 0},
        "evaluation": {"n_bootstrap": 50}}))
    return {"root": root, "inputs": inputs, "features": features, "labels": labels,
            "config": config}


def test_studies_to_features_abmil_predictions_and_heatmaps(cohort: dict[str, Path]) -> None:
    root, features = cohort["root"], cohort["features"]
    rows = list(csv.DictReader(cohort["labels"].open()))
    stores = {r["slide_id"]: open_features(features / r["slide_id"] /
                                           "features_efficientnet_lite0.zarr") for r in rows}
    nifti_study = next(s for s, store in stores.items()
                       if store.attrs["radiology"]["source_format"] == "nifti")
    assert len(stores[nifti_study]) == 25 and stores[nifti_study].feature_dim == 1280
    assert {store.attrs["grid"]["target_mpp"] for store in stores.values()} == {1500.0}

    run = root / "run"
    _invoke("train", str(cohort["config"]), "--out", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cases"] == 6 and 0.0 <= metrics["pooled"]["auc"]["value"] <= 1.0
    predictions = root / "predictions.csv"
    _invoke("predict", "--model", str(run), "--features", str(features), "--out",
            str(predictions), *stores)
    predicted = {r["slide_id"]: r for r in csv.DictReader(predictions.open())}
    truth = {r["slide_id"]: r["label"] for r in rows}
    assert sum(predicted[s]["predicted"] == truth[s] for s in truth) >= 5
    for row in predicted.values():
        assert float(row["prob_ct"]) + float(row["prob_mr"]) == pytest.approx(1.0, abs=1e-5)

    exports = root / "exports"
    _invoke("radiology", "heatmap", str(cohort["inputs"]), "--predictions", str(predictions),
            "--features", str(features), "--out", str(exports))
    for study in stores:
        assert (exports / study / "slice_attention.png").read_bytes()[:4] == b"\x89PNG"
        assert list((exports / study).glob("key_slice_1_z*.png"))
    anatomical = nib.load(Path(data_path) / "anatomical.nii")
    attention = nib.load(exports / nifti_study / "attention.nii.gz")
    np.testing.assert_array_equal(attention.affine, anatomical.affine)
    assert attention.shape == anatomical.shape
    per_slice = attention.get_fdata().transpose(1, 0, 2).reshape(-1, anatomical.shape[2])
    assert np.allclose(per_slice.std(axis=0), 0) and per_slice.sum() > 0  # one value per slice

    series = next(s for s, store in stores.items() if len(store) == 4)
    volume = read_dicom_study(find_dicom_studies([cohort["inputs"] / "ct_series"])[0],
                              StudyKeys.from_file(root / "features-radiology.key"))
    assert volume.study_id == series
    np.testing.assert_allclose(nib.load(exports / series / "attention.nii.gz").affine,
                               volume.affine)

    for folder in (features, exports):  # no identifiers in stores, summaries, logs, exports
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(word.encode() in data for word in IDENTIFIERS), path
    uids = {str(pydicom.dcmread(p).StudyInstanceUID) for p in cohort["inputs"].glob("*.dcm")}
    for store in stores.values():
        assert not any(uid in json.dumps(store.attrs) for uid in uids)


def test_radiograph_attention_overlay(tmp_path: Path) -> None:
    features = tmp_path / "features"
    _invoke("radiology", "extract", str(real("RG3_UNCR.dcm")), "--out", str(features),
            "--spacing", "0.1", "--random-weights", "--config",
            str(Path(__file__).parents[1] / "configs/radiology.example.yaml"))
    row = next(csv.DictReader((features / "radiology_summary.csv").open()))
    assert row["status"] == "ok" and row["kind"] == "image"
    store = open_features(features / row["study_id"] / "features_efficientnet_lite0.zarr")
    attention = np.zeros(len(store))
    attention[0] = 1.0  # all attention on the first patch
    write_attention(store.path, "attention_test", attention, {})
    volume = read_dicom_study(find_dicom_studies([real("RG3_UNCR.dcm")])[0],
                              StudyKeys.from_file(tmp_path / "features-radiology.key"), 0.1)
    [overlay] = export_study(volume, store, attention, tmp_path / "out", "auto")
    image = np.asarray(Image.open(overlay))
    assert image.shape == (*volume.shape[1:], 3)
    x, y = store.coords[0]
    inside = image[y + 5, x + 5].astype(int)
    assert inside[0] > inside[2] or inside[1] > inside[2] or not np.all(inside == inside[0])


def test_deidentify_command_writes_profile_compliant_copies(tmp_path: Path) -> None:
    series = write_series(tmp_path / "series", 3)
    out = tmp_path / "shareable"
    _invoke("radiology", "deidentify", str(tmp_path / "series"), "--out", str(out))
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 3 and len({p.parent for p in written}) == 1
    copies = [pydicom.dcmread(p) for p in written]
    originals = [pydicom.dcmread(p) for p in series]
    assert len({c.SeriesInstanceUID for c in copies}) == 1
    assert copies[0].SeriesInstanceUID != originals[0].SeriesInstanceUID
    for copy in copies:
        assert copy.PatientIdentityRemoved == "YES"
        assert copy.PatientName == copy.PatientID and copy.PatientID.startswith("patient-")
    assert not any(word.encode() in p.read_bytes() for word in IDENTIFIERS for p in written)
    assert written[0].parent.name.startswith("study-")


def test_dask_features_equal_in_process_features(cohort: dict[str, Path]) -> None:
    config = load_radiology_config(EXAMPLE_CONFIG)
    volume = read_nifti(cohort["inputs"] / "anatomical.nii",
                        StudyKeys.from_file(cohort["root"] / "features-radiology.key"))
    bag = build_bag(volume, config.volume, config.image, config.window)
    expected = Embedder(load_backbone(config.backbone))(bag.images).astype(np.float16)
    store = open_features(cohort["features"] / volume.study_id /
                          "features_efficientnet_lite0.zarr")
    np.testing.assert_allclose(store.features().astype(np.float32),
                               expected.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not (cohort["features"] / volume.study_id / "bag.npz").exists()


def test_extract_tells_studies_from_slides(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "slide-dicom").mkdir(parents=True)
    for number in range(2):  # DICOM-WSI headers: the folder is one slide
        ds = pydicom.dcmread(real("CT_small.dcm"))
        ds.Modality, ds.SOPClassUID = "SM", "1.2.840.10008.5.1.4.1.1.77.1.6"
        ds.save_as(archive / "slide-dicom" / f"level{number}.dcm")
    (archive / "small.svs").write_bytes(b"")
    write_series(archive / "ct_series", 3)
    (archive / "radiographs").mkdir()
    shutil.copy(real("CT_small.dcm"), archive / "radiographs" / "IM0001")  # no suffix
    shutil.copy(Path(data_path) / "anatomical.nii", archive / "anatomical.nii")
    (archive / "broken.nii.gz").write_bytes(b"not a volume")
    found = discover_inputs([archive])
    assert [e.path for e in found.slides] == [archive / "slide-dicom", archive / "small.svs"]
    assert sorted(p.relative_to(archive).as_posix() for p in found.studies) == [
        "anatomical.nii", "broken.nii.gz", *(f"ct_series/file{i:02d}.dcm" for i in range(3)),
        "radiographs/IM0001"]
    assert discover_inputs([archive], "ct").studies == [archive]
    assert discover_inputs([archive], "wsi").studies == []

    out = tmp_path / "out"
    result = runner.invoke(app, ["extract", str(archive / "ct_series"),
                                 str(archive / "anatomical.nii"), str(archive / "broken.nii.gz"),
                                 "--out", str(out), "--random-weights"])
    assert result.exit_code == 2, result.output
    rows = list(csv.DictReader((out / "radiology_summary.csv").open()))
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    assert "broken.nii.gz" in next(r["error"] for r in rows if r["status"] == "failed")
    for row in rows:
        if row["status"] == "ok":
            store = open_features(out / row["study_id"] / "features_efficientnet_lite0.zarr")
            assert len(store) == int(row["instances"]) and store.attrs["radiology"]
    assert (tmp_path / "out-radiology.key").is_file()
