"""Heatmap exports (pipelines.heatmaps, slidepipe heatmap) on real-tissue slides.

The lesion cohort's features are cheap colour statistics of each patch (mean, spread and
saturation of its pixels) so that a real attention-MIL model (ABMIL, cross-validated by
``train_run``, applied by ``predict_slides``) can be trained in seconds; its attention, read
back from the feature stores, must point at the known lesions.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
import typer
from PIL import Image
from shapely.geometry import box, shape
from shapely.ops import unary_union
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import wsi
from mil.heatmap import from_uint8, to_uint8
from pipelines.cli_heatmap import heatmap
from pipelines.discovery import discover_slides
from pipelines.feature_store import FeatureStoreWriter, open_features
from pipelines.heatmaps import (
    SUMMARY_CSV,
    HeatmapSettings,
    PseudonymError,
    export_heatmaps,
    export_slide,
    find_store,
    read_predictions,
)
from pipelines.heatmaps.worklist import WORKLIST_DIR, write_heatmap_worklist
from pipelines.mil_run import MILRunConfig, predict_slides, store_path, train_run, write_attention
from pipelines.run.predict import risk_score
from tests import builders
from wsi.fingerprint import content_hash
from wsi.writer import STAND_IN_IDENTIFIERS

BACKBONE = "colour_stats"
#: Small overlays keep the tests fast; the geometry is the same at any size.
FAST = {"overlay_max_side": 512, "top_k": 4}

cli = typer.Typer()
cli.command()(heatmap)
runner = CliRunner()


def colour_features(patches: np.ndarray) -> np.ndarray:
    """Per patch: mean and standard deviation of R, G, B, mean saturation, fraction of
    bluish (haematoxylin-rich) pixels."""
    pixels = patches.astype(np.float32) / 255.0
    high, low = pixels.max(-1), pixels.min(-1)
    saturation = (high - low) / np.maximum(high, 1e-3)
    bluish = (pixels[..., 2] > pixels[..., 0]).mean((1, 2))
    return np.column_stack([pixels.mean((1, 2)), pixels.std((1, 2)), saturation.mean((1, 2)),
                            bluish]).astype(np.float32)


def write_store(slide_path: Path, features: Path, slide_id: str, seed: int = 0) -> Path:
    """Tile ``slide_path`` on the default grid and store per-patch colour features (random
    ones with ``seed`` > 0) with the provenance slidepipe extract records."""
    settings = wsi.GridSettings()
    with wsi.open_slide(slide_path) as slide:
        spec = wsi.plan_grid(slide, settings)
        grid = wsi.build_grid(wsi.detect_tissue(slide), spec, settings)
        with wsi.PatchReader(slide, spec) as reader:
            values = (colour_features(reader.read_batch(grid.coords)) if not seed else
                      np.random.default_rng(seed).random((len(grid), 8), dtype=np.float32))
    path = store_path(features, BACKBONE, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = FeatureStoreWriter.open(
        path, key=f"test-{slide_id}", coords=grid.coords, feature_dim=values.shape[1],
        chunk_rows=4096, dtype="float32", attributes={
            "slide_path": str(slide_path), "slide_id": slide_id,
            "slide_hash": content_hash(slide_path), "backbone": BACKBONE,
            "weights_hash": "none", "feature_dim": values.shape[1], "grid": spec.as_dict()})
    writer.write_chunk(0, values)
    writer.finalize()
    return path


@dataclass(frozen=True)
class LesionRun:
    labels: Path
    features: Path
    predictions: Path
    boxes: dict[str, tuple[int, int, int, int]]


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory: pytest.TempPathFactory) -> LesionRun:
    """Eight real-tissue slides (four with a lesion), colour features, ABMIL trained with
    3-fold cross-validation, and its predictions with attention in the stores."""
    root = tmp_path_factory.mktemp("heatmaps")
    (root / "slides").mkdir()
    labels, boxes = builders.build_lesion_cohort(root / "slides", n_slides=8)
    rows = list(csv.DictReader(labels.read_text().splitlines()))
    for row in rows:
        write_store(root / "slides" / row["path"], root / "features", row["slide_id"])
    config = MILRunConfig.model_validate({
        "labels": str(labels), "features": str(root / "features"), "backbone": BACKBONE,
        "label_names": ["negative", "positive"], "cv": {"folds": 3, "seed": 0},
        "train": {"model": "abmil", "epochs": 25, "patience": 25, "learning_rate": 2e-3,
                  "max_instances": None, "seed": 0},
        "evaluation": {"n_bootstrap": 0}})
    train_run(config, root / "run")
    predictions = predict_slides([root / "run"], root / "features",
                                 [r["slide_id"] for r in rows], root / "predictions.csv")
    return LesionRun(labels, root / "features", predictions, boxes)


@pytest.fixture(scope="module")
def lesion_export(lesion_run: LesionRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lesion-export") / "export"
    results = export_heatmaps(discover_slides([lesion_run.labels]), lesion_run.predictions,
                              lesion_run.features, out, HeatmapSettings(**FAST))
    assert [r.status for r in results] == ["ok"] * 8, results
    return out


def _features_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def test_high_attention_area_overlaps_the_lesion(lesion_run: LesionRun,
                                                 lesion_export: Path) -> None:
    ious, aucs = [], []
    for slide_id, (x, y, w, h) in sorted(lesion_run.boxes.items()):
        lesion = box(x, y, x + w, y + h)
        regions = [shape(f["geometry"]) for f in _features_of(
            lesion_export / slide_id / "heatmap.geojson")
            if f["properties"]["objectType"] == "annotation"]
        found = unary_union(regions)
        iou = found.intersection(lesion).area / found.union(lesion).area
        with tiffslide.TiffSlide(lesion_export / slide_id / "heatmap.tiff") as tiff:
            codes = np.asarray(tiff.read_region((0, 0), 1, tiff.level_dimensions[1]))
        scores = from_uint8(codes)
        ds = 4
        rows, cols = np.mgrid[0:scores.shape[0], 0:scores.shape[1]]
        inside = ((cols + 0.5) * ds >= x) & ((cols + 0.5) * ds < x + w) & (
            (rows + 0.5) * ds >= y) & ((rows + 0.5) * ds < y + h)
        valid = np.isfinite(scores)
        auc = roc_auc_score(inside[valid], scores[valid])
        print(f"{slide_id}: IoU of the >= 0.65 region with the lesion {iou:.3f}, "
              f"pixel AUC {auc:.3f}")
        ious.append(iou)
        aucs.append(auc)
    print(f"mean IoU {np.mean(ious):.3f}, mean pixel AUC {np.mean(aucs):.3f}")
    assert np.mean(ious) >= 0.6 and min(ious) >= 0.3
    assert np.mean(aucs) >= 0.95 and min(aucs) >= 0.85


def test_geojson_is_valid_qupath_in_level0_coordinates(lesion_run: LesionRun,
                                                       lesion_export: Path) -> None:
    slide_id = sorted(lesion_run.boxes)[0]
    features = _features_of(lesion_export / slide_id / "heatmap.geojson")
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    annotations = [f for f in features if f["properties"]["objectType"] == "annotation"]
    store = find_store(lesion_run.features, slide_id, read_predictions(
        lesion_run.predictions)[slide_id].attention)
    with wsi.open_slide(lesion_run.labels.parent / f"{slide_id}.svs") as slide:
        frame = box(0, 0, *slide.dimensions)
    assert len(tiles) == 64 and annotations
    ranks = sorted(f["properties"]["measurements"]["rank"] for f in tiles)
    assert ranks == list(range(1, 65))
    for feature in features:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.area > 0
        assert frame.contains(geometry)
    for tile in tiles:
        measures = tile["properties"]["measurements"]
        assert set(measures) == {"attention", "score", "rank"}
        assert 0.0 <= measures["score"] <= 1.0
        assert shape(tile["geometry"]).area == 256 * 256
    top = min(tiles, key=lambda t: t["properties"]["measurements"]["rank"])
    assert top["properties"]["measurements"]["score"] == max(
        t["properties"]["measurements"]["score"] for t in tiles)
    assert all(a["properties"]["classification"]["name"] == "heatmap >= 0.65"
               and a["properties"]["measurements"]["area_mm2"] > 0 for a in annotations)
    assert store.name == f"features_{BACKBONE}.zarr"


def test_tiff_opens_with_openslide_and_tiffslide_at_level0_size(lesion_run: LesionRun,
                                                                lesion_export: Path) -> None:
    slide_id = sorted(lesion_run.boxes)[0]
    path = lesion_export / slide_id / "heatmap.tiff"
    tiles = _features_of(lesion_export / slide_id / "heatmap.geojson")
    with wsi.open_slide(lesion_run.labels.parent / f"{slide_id}.svs") as slide:
        size, mpp = slide.dimensions, slide.level0_mpp
    with openslide.OpenSlide(path) as opened:
        assert opened.dimensions == size
        assert float(opened.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-4)
        for tile in tiles[:64:7]:
            (x, y), *_ = tile["geometry"]["coordinates"][0]
            pixel = np.asarray(opened.read_region((x + 100, y + 100), 0, (1, 1)))[0, 0, 0]
            expected = to_uint8(np.float32(tile["properties"]["measurements"]["score"]))
            assert abs(int(pixel) - int(expected)) <= 1
    with tiffslide.TiffSlide(path) as opened:
        assert opened.dimensions == size and opened.level_count >= 2
        assert opened.properties["tiffslide.mpp-x"] == pytest.approx(mpp, rel=1e-4)


def test_summary_and_gallery(lesion_run: LesionRun, lesion_export: Path) -> None:
    slide_id = sorted(lesion_run.boxes)[1]
    folder = lesion_export / slide_id
    summary = json.loads((folder / "summary.json").read_text())
    prediction = read_predictions(lesion_run.predictions)[slide_id]
    assert summary["slide"] == slide_id and summary["grade"] == prediction.predicted
    assert summary["probabilities"] == pytest.approx(prediction.probabilities)
    assert summary["model_hash"] == prediction.model_hash
    assert summary["features"]["backbone"] == BACKBONE
    assert summary["features"]["grid"]["patch_size"] == 256
    assert summary["features"]["slidepipe_version"]
    assert summary["heatmap"]["threshold"] == 0.65 and summary["heatmap"]["colormap"] == "viridis"
    assert all((folder / name).is_file() for name in summary["exports"].values())
    assert (folder / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "slide_path" not in json.dumps(summary) and ".svs" not in json.dumps(summary)
    index = list(csv.DictReader((folder / "top_patches" / "index.csv").read_text()
                                .splitlines()))
    assert [int(r["rank"]) for r in index] == [1, 2, 3, 4]
    scores = [float(r["score"]) for r in index]
    assert scores == sorted(scores, reverse=True)
    with wsi.open_slide(lesion_run.labels.parent / f"{slide_id}.svs") as slide:
        spec = wsi.plan_grid(slide, wsi.GridSettings())
        with wsi.PatchReader(slide, spec) as reader:
            for row in index:
                assert f"_x{row['x']}_y{row['y']}_" in row["file"]
                crop = np.asarray(Image.open(folder / "top_patches" / row["file"]))
                assert np.array_equal(crop, reader.read_patch(int(row["x"]), int(row["y"])))
    x, y, w, h = lesion_run.boxes[slide_id]
    assert x <= int(index[0]["x"]) < x + w and y <= int(index[0]["y"]) < y + h


def test_refinement_patches_merge_into_the_tiff(lesion_run: LesionRun, tmp_path: Path) -> None:
    slide_id = sorted(lesion_run.boxes)[0]
    prediction = read_predictions(lesion_run.predictions)[slide_id]
    store = find_store(lesion_run.features, slide_id, prediction.attention)
    x, y, _, _ = lesion_run.boxes[slide_id]
    fine = np.array([[x, y], [x + 64, y]])
    slide_path = lesion_run.labels.parent / f"{slide_id}.svs"
    settings = HeatmapSettings(**FAST, normalise="absolute", geojson=False)
    summary = export_slide(slide_path, store, prediction, tmp_path / "plain", settings,
                           name=slide_id)
    refined = export_slide(slide_path, store, prediction, tmp_path / "refined", settings,
                           name=slide_id, extra=[(fine, np.array([0.0, 1.0]), 64)])
    assert summary["extra_patches"] == 0 and refined["extra_patches"] == 2
    with openslide.OpenSlide(tmp_path / "plain" / "heatmap.tiff") as plain, \
            openslide.OpenSlide(tmp_path / "refined" / "heatmap.tiff") as merged:
        def at(opened: openslide.OpenSlide, px: int, py: int) -> float:
            code = np.asarray(opened.read_region((px, py), 0, (1, 1)))[0, 0, 0]
            return float(from_uint8(np.array(code)))
        base = at(plain, x + 10, y + 10)
        assert at(merged, x + 10, y + 10) == pytest.approx(base / 2, abs=0.005)
        assert at(merged, x + 70, y + 10) == pytest.approx((base + 1) / 2, abs=0.005)
        assert at(merged, x + 200, y + 10) == pytest.approx(base, abs=0.005)


def _export_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _worklist(out: Path) -> list[dict[str, str]]:
    """The rows of the HTML export's ``worklist.csv``, in rank order."""
    return list(csv.DictReader((out / WORKLIST_DIR / "worklist.csv").read_text().splitlines()))


def test_no_label_macro_or_identifying_metadata_in_the_export(small_svs: Path,
                                                              tmp_path: Path) -> None:
    features = tmp_path / "features"
    store = write_store(small_svs, features, "small", seed=3)
    with wsi.open_slide(small_svs) as slide:
        width, height = slide.dimensions
    xy = open_features(store).coords
    attention = np.exp(-((xy[:, 0] - width / 3) ** 2 + (xy[:, 1] - height / 2) ** 2)
                       / (2 * (width / 6) ** 2))
    write_attention(store, "attention_abc", attention / attention.sum(),
                    {"models": ["abc"], "label_names": ["negative", "positive"]})
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("slide_id,predicted,model_hash,attention,prob_negative,"
                           "prob_positive\nsmall,positive,abc,attention_abc,0.2,0.8\n")
    out = tmp_path / "export"
    entries, settings = discover_slides([small_svs]), HeatmapSettings(**FAST,
                                                                       gallery_format="jpeg")
    results = export_heatmaps(entries, predictions, features, out, settings)
    assert results[0].status == "ok", results
    index = write_heatmap_worklist(out, entries, results, predictions, features, settings)
    assert index == out / WORKLIST_DIR / "index.html" and index.is_file()

    secrets = [*STAND_IN_IDENTIFIERS.values(), str(small_svs), small_svs.name]
    with tifffile.TiffFile(small_svs) as tif:
        associated = [page for page in tif.pages
                      if page.description and any(n in page.description.splitlines()[-1]
                                                  for n in ("label", "macro"))]
        assert len(associated) == 2
        snippets = []
        handle = tif.filehandle
        for page in associated:
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                handle.seek(offset + count // 2)
                snippets.append(handle.read(48))
    files = _export_files(out)
    assert {p.suffix for p in files} >= {".png", ".jpg", ".tiff", ".geojson", ".json", ".csv",
                                         ".html", ".dzi", ".js"}
    for path in files:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path
        assert not any(snippet in data for snippet in snippets), path
        if path.suffix in (".png", ".jpg"):
            rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
            magenta = (rgb[..., 0] > 220) & (rgb[..., 1] < 40) & (rgb[..., 2] > 220)
            assert not magenta.any(), path
    with wsi.open_slide(small_svs) as slide:
        label = slide.associated_image("label")
    assert (np.abs(label.astype(int) - builders.LABEL_COLOUR).max(-1) < 30).mean() > 0.3


def test_pseudonymised_export_hides_names_and_keeps_the_mapping_outside(
        lesion_run: LesionRun, tmp_path: Path) -> None:
    entries = discover_slides([lesion_run.labels])[:3]
    out = tmp_path / "export"
    settings = HeatmapSettings(**FAST, pseudonymise=True)
    results = export_heatmaps(entries, lesion_run.predictions, lesion_run.features, out,
                              settings)
    assert all(r.status == "ok" for r in results)
    write_heatmap_worklist(out, entries, results, lesion_run.predictions, lesion_run.features,
                           settings)
    mapping_path = tmp_path / "export-pseudonyms.csv"
    mapping = {r["slide_id"]: r["pseudonym"] for r in csv.DictReader(
        mapping_path.read_text().splitlines())}
    assert set(mapping) == {e.slide_id for e in entries}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        [*mapping.values(), WORKLIST_DIR])
    assert not (out / "export-pseudonyms.csv").exists()
    assert {row["slide"] for row in _worklist(out)} == set(mapping.values())
    pages = list((out / WORKLIST_DIR / "slides").glob("*/index.html"))
    assert len(pages) == len(entries)
    names = [n.encode() for e in entries for n in (
        e.slide_id, e.path.name, str(e.path), str(e.path.absolute()), e.path.stem)]
    for path in _export_files(out):
        assert not any(n.decode() in str(path.relative_to(out)) for n in names), path
        assert not any(n in path.read_bytes() for n in names), path
    again = export_heatmaps(entries, lesion_run.predictions, lesion_run.features,
                            tmp_path / "export2", settings.model_copy(update={
                                "pseudonym_key": mapping_path.with_suffix(".key")}))
    assert [r.slide for r in again] == [mapping[e.slide_id] for e in entries]
    inside = settings.model_copy(update={"pseudonym_map": out / "map.csv"})
    with pytest.raises(PseudonymError, match="outside"):
        export_heatmaps(entries, lesion_run.predictions, lesion_run.features, out, inside)


def test_one_failing_slide_is_recorded_and_the_others_go_on(lesion_run: LesionRun,
                                                            tmp_path: Path) -> None:
    entries = discover_slides([lesion_run.labels])[:2]
    rows = lesion_run.predictions.read_text().splitlines()
    partial = tmp_path / "predictions.csv"
    partial.write_text("\n".join([rows[0], *[r for r in rows[1:]
                                             if r.startswith(entries[1].slide_id)]]) + "\n")
    out = tmp_path / "export"
    results = export_heatmaps(entries, partial, lesion_run.features, out,
                              HeatmapSettings(**FAST))
    assert [r.status for r in results] == ["failed", "ok"]
    summary = list(csv.DictReader((out / SUMMARY_CSV).read_text().splitlines()))
    assert summary[0]["status"] == "failed"
    assert "no prediction for slide" in summary[0]["error"]
    assert not (out / entries[0].slide_id).exists() and (out / entries[1].slide_id).is_dir()


def test_cli_exit_codes(lesion_run: LesionRun, tmp_path: Path) -> None:
    slides = [str(e.path) for e in discover_slides([lesion_run.labels])[:2]]
    common = ["--predictions", str(lesion_run.predictions), "--features",
              str(lesion_run.features), "--top-k", "2", "--colormap", "magma",
              "--normalise", "rank", "--smooth", "20", "--output-mpp", "4"]
    result = runner.invoke(cli, [*slides, *common, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "2 exported, 0 failed" in result.output
    summary = json.loads(next((tmp_path / "a").glob("*/summary.json")).read_text())
    assert summary["heatmap"]["colormap"] == "magma" and summary["heatmap"]["smooth_um"] == 20
    assert summary["heatmap"]["overlay_mpp"] == pytest.approx(4, rel=0.01)

    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    result = runner.invoke(cli, [*slides, str(broken), *common, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "failed broken" in result.output
    assert "broken.svs" in (tmp_path / "b" / "slidepipe.log").read_text()

    result = runner.invoke(cli, [*slides, str(broken), *common, "--pseudonymise",
                                 "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert "broken" not in result.output and "case0" not in result.output
    assert (tmp_path / "p-heatmap.log").is_file() and (tmp_path / "p-pseudonyms.csv").is_file()
    assert (tmp_path / "p" / WORKLIST_DIR / "index.html").is_file()
    assert not any("case0" in p.name or p.name.endswith(".log")
                   for p in (tmp_path / "p").rglob("*"))

    result = runner.invoke(cli, [*slides, "--predictions", str(tmp_path / "missing.csv"),
                                 "--features", str(lesion_run.features),
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "cannot read the predictions" in result.output
    result = runner.invoke(cli, [*slides, *common[:4], "--colormap", "jet",
                                 "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "perceptually uniform" in result.output


def test_cli_writes_the_html_worklist_by_risk_and_no_html_skips_it(lesion_run: LesionRun,
                                                                    tmp_path: Path) -> None:
    entries = discover_slides([lesion_run.labels])[:4]
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    common = ["--predictions", str(lesion_run.predictions), "--features",
              str(lesion_run.features), "--top-k", "3", "--output-mpp", "4"]
    out = tmp_path / "out"
    result = runner.invoke(cli, [*(str(e.path) for e in entries), str(broken), *common,
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    index = out / WORKLIST_DIR / "index.html"
    assert f"HTML worklist: {index}" in result.output
    predictions = read_predictions(lesion_run.predictions)
    risks = {e.slide_id: risk_score(list(predictions[e.slide_id].probabilities.values()))
             for e in entries}
    rows = _worklist(out)  # the failed slide is only in heatmap_summary.csv
    assert [r["slide"] for r in rows] == sorted(risks, key=lambda s: -risks[s])
    assert len(set(risks.values())) == len(risks)  # a strict order to check
    for rank, row in enumerate(rows, start=1):
        prediction = predictions[row["slide"]]
        assert int(row["rank"]) == rank and row["grade"] == prediction.predicted
        assert float(row["risk"]) == pytest.approx(risks[row["slide"]])
        assert float(row["probability"]) == pytest.approx(prediction.probability)
        assert row["qc_status"] == "ok" and not row["error"]
        page = out / WORKLIST_DIR / row["viewer"]
        assert page.is_file() and row["slide"] in page.read_text()
        assert (page.parent / "slide.dzi").is_file()
        assert any((page.parent / "slide_files").rglob("*.jpg"))
    listed = index.read_text()
    links = [listed.index(f'href="{row["viewer"]}"') for row in rows]
    assert links == sorted(links)
    assert "broken" not in listed
    summary = list(csv.DictReader((out / SUMMARY_CSV).read_text().splitlines()))
    assert [r["status"] for r in summary] == ["ok"] * 4 + ["failed"]

    plain = tmp_path / "plain"
    result = runner.invoke(cli, [str(entries[0].path), *common, "--no-html", "--out",
                                 str(plain)])
    assert result.exit_code == 0, result.output
    assert (plain / entries[0].slide_id / "summary.json").is_file()
    assert not (plain / WORKLIST_DIR).exists() and "HTML" not in result.output
    assert not any(p.suffix in (".html", ".dzi") for p in _export_files(plain))

    # a failing HTML step (here: its folder is taken) keeps the per-slide exports
    (plain / WORKLIST_DIR).mkdir()
    (plain / WORKLIST_DIR / "notes.txt").write_text("mine")
    result = runner.invoke(cli, [str(entries[0].path), *common, "--out", str(plain)])
    assert result.exit_code == 1, result.output
    assert "HTML export could not be written" in result.output
    assert (plain / entries[0].slide_id / "overlay.png").is_file()
    assert (plain / SUMMARY_CSV).is_file()
    assert (plain / WORKLIST_DIR / "notes.txt").read_text() == "mine"
