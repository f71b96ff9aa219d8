"""Grad-CAM inside top patches and heatmap refinement, on real-tissue slides with known lesions.

One module-wide cohort: eight lesion-cohort slides (four with a 3 x 3-block lesion of real
epithelium in real stroma), their efficientnet_lite0 features (fp16 stores, as extraction
writes them), an ABMIL trained on four of them and the attention ``predict`` stores.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from PIL import Image
from scipy.stats import spearmanr
from typer.testing import CliRunner

from mil.models import build_model
from pipelines.backbones import BackboneConfig, load_backbone
from pipelines.cli_gradcam import SUMMARY_NAME, gradcam
from pipelines.config import load_config
from pipelines.discovery import discover_slides
from pipelines.explain import (
    ExplanationError,
    ModelEnsemble,
    load_store_backbone,
    open_slide_context,
)
from pipelines.extract import backbone_tag, extract_archive
from pipelines.feature_store import FeatureStoreWriter, open_features
from pipelines.gradcam import FeatureMapTap, NotACnnError, grad_cam
from pipelines.inference import Embedder
from pipelines.mil_run import (
    MILRunConfig,
    feature_provenance,
    load_checkpoint,
    predict_slides,
    save_checkpoint,
    store_path,
    train_run,
)
from pipelines.refine import fine_positions, load_refined, refine_slide, select_regions
from tests.builders import LESION_BLOCK, _real_blocks, build_lesion_cohort

BACKBONE = "efficientnet_lite0"
HALF = LESION_BLOCK // 2
runner = CliRunner()


class Cohort:
    """Paths and facts of the module's cohort."""

    def __init__(self, root: Path, boxes: dict[str, tuple[int, int, int, int]]) -> None:
        self.root = root
        self.slides = root / "slides"
        self.features = root / "features"
        self.run = root / "run"
        self.boxes = boxes

    def store(self, slide_id: str) -> Path:
        return store_path(self.features, BACKBONE, slide_id)

    def slide(self, slide_id: str) -> Path:
        return self.slides / f"{slide_id}.svs"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Eight slides, their features, an ABMIL trained on case00-03 (validated on case04-05,
    tested on case06-07) and the attention of case03 and case05 stored by predict."""
    root = tmp_path_factory.mktemp("gradcam")
    (root / "slides").mkdir()
    labels, boxes = build_lesion_cohort(root / "slides", n_slides=8)
    rows = list(csv.DictReader(labels.read_text().splitlines()))
    for index, row in enumerate(rows):
        row["split"] = "train" if index < 4 else ("val" if index < 6 else "test")
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = load_config(None, {"extraction": {"chunk_rows": 32},
                                "cluster": {"workers": 1, "dashboard": None}})
    results = extract_archive(discover_slides([labels]), config, root / "features")
    assert all(r.status == "ok" for r in results), results
    cohort = Cohort(root, boxes)
    train_run(MILRunConfig.model_validate({
        "labels": str(labels), "features": str(cohort.features), "backbone": BACKBONE,
        "label_names": ["negative", "positive"], "cv": {"mode": "fixed"},
        "train": {"model": "abmil", "epochs": 20, "patience": 20, "learning_rate": 5e-4,
                  "max_instances": None, "seed": 0}}), cohort.run)
    predict_slides([cohort.run], cohort.features, ["case03", "case05"], root / "pred.csv",
                   device="cpu")
    return cohort


@pytest.fixture(scope="module")
def models(cohort: Cohort) -> ModelEnsemble:
    return ModelEnsemble.load([cohort.run], "cpu")


def _mixed_patches() -> list[tuple[np.ndarray, str]]:
    """Patches whose one half is real lesion epithelium and the other half real stroma, with
    the side the lesion is on."""
    lesion, stroma = _real_blocks(purple=True), _real_blocks(purple=False, count=3)
    patches = []
    for index in range(3):
        mixed = np.concatenate([lesion[index][:, :HALF], stroma[index][:, HALF:]], axis=1)
        patches += [(mixed, "left"), (np.ascontiguousarray(mixed[:, ::-1]), "right")]
    return patches


def _lesion_fraction(cam: np.ndarray, side: str) -> float:
    half = cam[:, :HALF] if side == "left" else cam[:, HALF:]
    return float(half.sum() / cam.sum())


def test_the_model_is_driven_by_the_lesion(cohort: Cohort, models: ModelEnsemble) -> None:
    """Precondition of the CAM checks: held-out slides are graded right, and a half-lesion
    patch in a lesion-free bag raises the lesion class's logit."""
    for slide_id, expected in (("case06", 0), ("case07", 1)):
        probabilities, _ = models.predict(torch.from_numpy(
            open_features(cohort.store(slide_id)).features()))
        assert models.predicted_class(probabilities) == expected, (slide_id, probabilities)
    with open_slide_context(cohort.store("case00"), cohort.slide("case00")) as context:
        tap = FeatureMapTap(load_store_backbone(context.store, models.device))
        bag = context.store.features()
        mixed, _ = _mixed_patches()[0]
        with torch.no_grad():
            features, _ = tap(mixed[None])
            substituted = torch.from_numpy(bag.copy())
            substituted[0] = features[0]
            before = float(models.class_logit(torch.from_numpy(bag), 1))
            after = float(models.class_logit(substituted, 1))
    assert after > before + 0.1, (before, after)


def test_cam_mass_falls_on_the_lesion_half(cohort: Cohort, models: ModelEnsemble) -> None:
    with open_slide_context(cohort.store("case00"), cohort.slide("case00")) as context:
        tap = FeatureMapTap(load_store_backbone(context.store, models.device))
        bag = context.store.features()
        patches = _mixed_patches()
        result = grad_cam(tap, models, bag, [0] * len(patches),
                          np.stack([patch for patch, _ in patches]), class_index=1)
    fractions = [_lesion_fraction(cam, side)
                 for cam, (_, side) in zip(result.cams, patches, strict=True)]
    print(f"CAM mass on the lesion half: {np.round(fractions, 3).tolist()}")
    assert result.cams.shape == (len(patches), LESION_BLOCK, LESION_BLOCK)
    assert np.all(result.raw_max > 0) and np.allclose(result.cams.max(axis=(1, 2)), 1.0)
    assert min(fractions) >= 0.7 and np.mean(fractions) >= 0.8, fractions


def test_cam_changes_when_the_mil_weights_are_randomised(cohort: Cohort,
                                                         models: ModelEnsemble) -> None:
    """Adebayo et al. (2018) model-randomisation check: re-initialised MIL weights must give
    a different CAM (rank correlation with the trained model's CAM well below 1)."""
    patch, _ = _mixed_patches()[0]
    with open_slide_context(cohort.store("case00"), cohort.slide("case00")) as context:
        tap = FeatureMapTap(load_store_backbone(context.store, models.device))
        bag = context.store.features()
        trained = grad_cam(tap, models, bag, [0], patch[None], class_index=1).cams[0]
        again = grad_cam(tap, models, bag, [0], patch[None], class_index=1).cams[0]
        correlations, changes = [], []
        for seed in range(3):
            randomised = copy.deepcopy(models)
            torch.manual_seed(seed)
            for model in randomised.models:
                for module in model.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            cam = grad_cam(tap, randomised, bag, [0], patch[None], class_index=1).cams[0]
            correlations.append(float(spearmanr(trained.ravel(), cam.ravel()).statistic))
            changes.append(float(np.abs(trained - cam).mean()))
    print(f"Spearman trained vs randomised: {np.round(correlations, 3).tolist()}, "
          f"mean |change| {np.round(changes, 3).tolist()}")
    np.testing.assert_array_equal(trained, again)  # deterministic
    assert max(correlations) < 0.8 and np.mean(correlations) < 0.5, correlations
    assert min(changes) > 0.05, changes


def test_recomputed_features_equal_the_stored_ones(cohort: Cohort,
                                                   models: ModelEnsemble) -> None:
    with open_slide_context(cohort.store("case05"), cohort.slide("case05")) as context:
        backbone = load_store_backbone(context.store, models.device)
        rows = np.arange(0, context.store.num_patches, 7)
        pixels = context.model_pixels(context.read_patches(context.store.coords[rows]))
        recomputed, _ = FeatureMapTap(backbone)(pixels)
        recomputed = recomputed.detach().numpy()
        stored = context.store.features(rows)
    assert context.store.dtype == np.float16
    difference = np.abs(recomputed - stored)
    print(f"max |recomputed - stored| = {difference.max():.2e} (fp16 storage)")
    assert np.all(difference <= 2.0 ** -11 * np.abs(stored) + 1e-4)
    # the hook changes nothing: the extraction path gives the same numbers
    np.testing.assert_allclose(recomputed, Embedder(backbone)(pixels), rtol=1e-5, atol=1e-5)


def test_regions_and_fine_positions() -> None:
    coords = np.array([[0, 0], [256, 0], [1792, 1792], [512, 512]], dtype=np.int64)
    attention = np.array([0.1, 0.2, 0.6, 0.1], dtype=np.float32)
    boxes = select_regions(coords, attention, footprint=256, step=256,
                           level0_size=(2048, 2048), top_k=2)
    np.testing.assert_array_equal(boxes, [[1536, 1536, 2048, 2048], [0, 0, 768, 512]])
    above = select_regions(coords, attention, footprint=256, step=256,
                           level0_size=(2048, 2048), above=0.3, neighbourhood=0)
    np.testing.assert_array_equal(above, [[256, 0, 512, 256], [1792, 1792, 2048, 2048]])
    positions = fine_positions(boxes, stride=128, footprint=256)
    assert len(positions) == 9 + 15 and np.all(positions % 128 == 0)
    assert np.all(positions[:, 1][1:] >= positions[:, 1][:-1])  # row-major
    with pytest.raises(ValueError, match="top_k"):
        select_regions(coords, attention, footprint=256, step=256, level0_size=(2048, 2048),
                       top_k=None)


def test_refinement_inside_top_regions(cohort: Cohort, models: ModelEnsemble,
                                       tmp_path: Path) -> None:
    store = cohort.store("case05")
    refined = refine_slide(store, cohort.slide("case05"), models, top_k=2)
    coords, scores, footprint = refined
    stored = open_features(store)
    attention = np.asarray(zarr.open_group(store, mode="r")[f"attention_{models.model_hash}"][:])
    width, height = 2048, 2048
    stride = footprint // 2
    top = stored.coords[np.argsort(-attention, kind="stable")[:2]]
    regions = np.column_stack([np.maximum(top - 256, 0), np.minimum(top + 512, width)])
    assert footprint == 256 and len(coords) > 0 and coords.dtype == np.int64
    assert np.all(coords % stride == 0)
    assert np.all((coords >= 0) & (coords + footprint <= [width, height]))
    inside = ((coords[:, None, 0] >= regions[None, :, 0])
              & (coords[:, None, 1] >= regions[None, :, 1])
              & (coords[:, None, 0] + footprint <= regions[None, :, 2])
              & (coords[:, None, 1] + footprint <= regions[None, :, 3]))
    assert inside.any(axis=1).all()
    # stored positions keep their stored attention; new ones lie between grid positions
    index = {tuple(c): i for i, c in enumerate(stored.coords.tolist())}
    on_grid = np.array([tuple(c) in index for c in coords.tolist()])
    assert 0 < on_grid.sum() < len(coords)
    np.testing.assert_allclose(scores[on_grid], attention[[index[tuple(c)] for c in
                                                           coords[on_grid].tolist()]],
                               rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
    # the lesion stays hot at the finer stride
    x, y, w, h = cohort.boxes["case05"]
    centres = coords + footprint // 2
    in_lesion = ((centres[:, 0] >= x) & (centres[:, 0] < x + w) & (centres[:, 1] >= y)
                 & (centres[:, 1] < y + h))
    assert in_lesion.any() and scores[in_lesion].mean() > 2 * scores[~in_lesion].mean()
    loaded = load_refined(store, models.model_hash)
    assert loaded is not None
    again, attrs = loaded
    np.testing.assert_array_equal(again.coords, coords)
    np.testing.assert_array_equal(again.scores, scores)
    assert again.footprint == footprint and attrs["stride"] == stride
    assert attrs["new_patches"] == int((~on_grid).sum())

    model, metadata, _ = load_checkpoint(cohort.run / "fold_0" / "model.pt")
    metadata["feature_provenance"] = {**metadata["feature_provenance"],
                                      "weights_hash": "0123456789abcdef"}
    save_checkpoint(tmp_path / "other.pt", model, metadata)
    with pytest.raises(ExplanationError, match="trained on"):
        refine_slide(store, cohort.slide("case05"), [tmp_path / "other.pt"], device="cpu")


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("gradcam")(gradcam)
    app.callback()(lambda: None)
    return app


def test_cli_writes_patches_overlays_and_index(cohort: Cohort, tmp_path: Path) -> None:
    out = tmp_path / "gradcam"
    result = runner.invoke(_cli(), [
        "gradcam", "--model", str(cohort.run), "--features", str(cohort.features),
        "--out", str(out), "--top-k", "3", str(cohort.slide("case05")),
        str(cohort.slide("case04"))])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "case05" / "index.json").read_text())
    assert index["class"] == "positive" and index["attention_source"].startswith("attention_")
    assert index["footprint_level0"] == 256 and len(index["patches"]) == 3
    x, y, w, h = cohort.boxes["case05"]
    for entry in index["patches"]:
        assert x <= entry["x"] < x + w and y <= entry["y"] < y + h  # top patches: the lesion
        assert entry["feature_max_abs_diff"] < 1e-2
        with Image.open(out / "case05" / entry["png"]) as image:
            assert image.format == "PNG" and image.size == (2 * 256 + 4, 256)
        cam = np.load(out / "case05" / entry["cam"])
        assert cam.shape == (256, 256) and cam.min() >= 0 and cam.max() == pytest.approx(1)
    attention = [e["attention"] for e in index["patches"]]
    assert attention == sorted(attention, reverse=True)
    negative = json.loads((out / "case04" / "index.json").read_text())
    assert negative["class"] == "negative" and negative["attention_source"] == "recomputed"
    text = (out / "case05" / "index.json").read_text()
    assert str(cohort.slides) not in text and "label" not in text and "macro" not in text
    summary = list(csv.DictReader((out / SUMMARY_NAME).read_text().splitlines()))
    assert [r["status"] for r in summary] == ["ok", "ok"]

    missing = tmp_path / "elsewhere" / "case99.svs"
    missing.parent.mkdir()
    missing.write_bytes(cohort.slide("case05").read_bytes())
    result = runner.invoke(_cli(), [
        "gradcam", "--model", str(cohort.run), "--features", str(cohort.features),
        "--out", str(tmp_path / "partial"), "--top-k", "1", "--class", "positive",
        str(cohort.slide("case01")), str(missing)])
    assert result.exit_code == 2, result.output
    assert "case99" in result.output and "run feature extraction" in result.output
    assert (tmp_path / "partial" / "case01" / "index.json").is_file()

    result = runner.invoke(_cli(), [
        "gradcam", "--model", str(cohort.run), "--features", str(cohort.features),
        "--out", str(tmp_path / "bad"), "--class", "tumour", str(cohort.slide("case01"))])
    assert result.exit_code == 1 and "unknown class 'tumour'" in result.output


def test_non_cnn_backbone_is_a_clear_error(cohort: Cohort, tmp_path: Path) -> None:
    """Features of a vision transformer: the command names the alternative and exits 1."""
    vit = load_backbone(BackboneConfig(name="timm:vit_tiny_patch16_224", pretrained=False))
    with pytest.raises(NotACnnError, match="attention heatmap"):
        FeatureMapTap(vit)
    source = open_features(cohort.store("case01"))
    provenance = {k: v for k, v in source.attrs.items() if k not in ("schema", "key", "layout")}
    attrs = {**provenance, "backbone": vit.spec.name, "weights_hash": vit.weights_hash,
             "feature_dim": vit.spec.feature_dim,
             "config": {**source.attrs["config"],
                        "backbone": vit.config.model_dump(mode="json")}}
    features = tmp_path / "vit-features"
    path = features / "case01" / f"features_{backbone_tag(vit.spec.name)}.zarr"
    path.parent.mkdir(parents=True)
    writer = FeatureStoreWriter.open(path, key="vit", coords=np.asarray(source.coords),
                                     feature_dim=vit.spec.feature_dim, chunk_rows=64,
                                     dtype="float16", attributes=attrs)
    rng = np.random.default_rng(0)
    for chunk in writer.pending_chunks():
        rows = writer.chunk_slice(chunk)
        writer.write_chunk(chunk, rng.random((rows.stop - rows.start, vit.spec.feature_dim),
                                             dtype=np.float32))
    writer.finalize()
    save_checkpoint(tmp_path / "vit-abmil.pt", build_model("abmil", vit.spec.feature_dim, 2), {
        "model": "abmil", "model_options": {}, "in_dim": vit.spec.feature_dim, "n_classes": 2,
        "label_names": ["negative", "positive"], "threshold": None,
        "feature_provenance": feature_provenance(open_features(path).attrs)})
    result = runner.invoke(_cli(), [
        "gradcam", "--model", str(tmp_path / "vit-abmil.pt"), "--features", str(features),
        "--out", str(tmp_path / "out"), str(cohort.slide("case01"))])
    assert result.exit_code == 1, result.output
    assert "Grad-CAM needs a CNN backbone" in result.output
    assert "efficientnet_lite0" in result.output
    assert not (tmp_path / "out" / "case01").exists()
