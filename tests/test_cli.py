"""`slidepipe info` and `slidepipe tile` over archives with good and bad slides."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, real_svs: Path, small_svs: Path,
            truncated_svs: Path, png_named_svs: Path, zero_byte_slide: Path, blank_svs: Path,
            no_mpp_tiff: Path) -> Path:
    """A folder tree mixing real slides with every kind of bad input."""
    root = tmp_path_factory.mktemp("archive")
    (root / "case-a").mkdir()
    (root / "case-b" / "deeper").mkdir(parents=True)
    shutil.copy(real_svs, root / "case-a" / "CMU-1-Small-Region.svs")
    shutil.copy(small_svs, root / "case-b" / "deeper" / "mosaic.svs")
    for bad in (truncated_svs, png_named_svs, zero_byte_slide, blank_svs, no_mpp_tiff):
        shutil.copy(bad, root / "case-b" / bad.name)
    (root / "case-b" / "notes.txt").write_text("not a slide, not picked up")
    return root


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_tile_archive_goes_on_past_bad_slides(archive: Path, tmp_path: Path,
                                               no_mpp_tiff: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(archive), "--out", str(out)])
    assert result.exit_code == 2, result.output
    rows = _summary(out)
    assert rows["CMU-1-Small-Region"]["status"] == "ok"
    assert int(rows["CMU-1-Small-Region"]["patches"]) >= 30
    assert rows["mosaic"]["status"] == "ok"
    assert rows[Path(_name(archive, "blank")).stem]["status"] == "no_tissue"
    assert "no tissue" in rows[Path(_name(archive, "blank")).stem]["error"]
    failed = {k for k, r in rows.items() if r["status"] == "failed"}
    assert failed == {"truncated", "png-named", "empty", no_mpp_tiff.stem}
    assert "µm/px" in rows[no_mpp_tiff.stem]["error"]
    assert "empty" in rows["empty"]["error"]
    for slide_id in ("CMU-1-Small-Region", "mosaic"):
        folder = out / slide_id
        for name in ("grid.zarr", "coords.h5", "provenance.json", "tissue.png",
                     "tissue.geojson", "overview.png"):
            assert (folder / name).exists(), name
    for slide_id in failed:
        assert not (out / slide_id).exists()
    assert not list(out.glob(".*partial*"))
    assert "Traceback" in (out / "slidepipe.log").read_text()
    assert "Traceback" not in result.output


def _name(archive: Path, prefix: str) -> str:
    return next(p.name for p in archive.rglob(f"{prefix}*"))


def test_tile_with_manifest_overrides_and_config(tmp_path: Path, no_mpp_tiff: Path,
                                                 real_svs: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,slide_id,mpp\n{no_mpp_tiff},nompp,0.499\n{real_svs},real,\n")
    config = tmp_path / "config.yaml"
    config.write_text("tiling:\n  patch_size: 128\n  target_mpp: 1.0\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(manifest), "--out", str(out), "--config",
                                 str(config), "--qc"])
    assert result.exit_code == 0, result.output
    rows = _summary(out)
    assert rows["nompp"]["status"] == "ok" and rows["real"]["status"] == "ok"
    provenance = json.loads((out / "real" / "provenance.json").read_text())
    assert provenance["spec"]["patch_size"] == 128
    assert provenance["provenance"]["config"]["tiling"]["target_mpp"] == 1.0
    assert provenance["provenance"]["slide"]["mpp_source"] == "metadata"
    assert "white_fraction" in provenance["measurements"]


def test_mpp_override_csv_option(tmp_path: Path, no_mpp_tiff: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{no_mpp_tiff.name},0.499\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(no_mpp_tiff), "--out", str(out), "--mpp-overrides",
                                 str(table)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / no_mpp_tiff.stem / "provenance.json").read_text())
    assert provenance["provenance"]["slide"]["mpp_source"] == "override"


def test_bad_config_is_fatal_with_one_line(tmp_path: Path, real_svs: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tiling:\n  patch_sise: 128\n")
    result = runner.invoke(app, ["tile", str(real_svs), "--out", str(tmp_path / "o"), "--config",
                                 str(config)])
    assert result.exit_code == 1
    assert "patch_sise" in result.output and "Traceback" not in result.output


def test_info_hides_phi_unless_asked(large_svs: Path) -> None:
    hidden = runner.invoke(app, ["info", str(large_svs), "--json"])
    assert hidden.exit_code == 0, hidden.output
    record = json.loads(hidden.stdout)[0]
    assert record["vendor"] == "aperio" and record["mpp_x"] == pytest.approx(0.499)
    assert "jane.doe" not in hidden.output and "PATIENT-SECRET" not in hidden.output
    assert "label" not in hidden.output
    shown = runner.invoke(app, ["info", str(large_svs), "--show-phi", "--json"])
    assert "jane.doe" in shown.output and "label" in shown.output
    table = runner.invoke(app, ["info", str(large_svs)])
    assert table.exit_code == 0 and "aperio" in table.output


def test_info_reports_bad_slides_with_exit_code(png_named_svs: Path) -> None:
    result = runner.invoke(app, ["info", str(png_named_svs), "--json"])
    assert result.exit_code == 2
    assert "not a readable slide" in json.loads(result.stdout)[0]["error"]


def test_default_yaml_documents_the_built_in_defaults(repo_root: Path) -> None:
    from pipelines.config import load_config

    assert load_config(repo_root / "configs" / "default.yaml") == load_config(None)


def test_nightly_example_is_a_valid_run_config(repo_root: Path) -> None:
    from pipelines.run.config import load_run_config

    config = load_run_config(repo_root / "configs" / "nightly.example.yaml")
    assert config.archive == [Path("/archive/pathology/slides")]
    assert config.out == Path("/data/slidepipe/nightly")
    assert config.stages == ["tile", "extract", "predict", "export"]
    assert config.run.max_runtime == 10 * 3600 and config.run.slide_timeout == 2 * 3600
    assert config.heatmap.threshold == 0.65 and config.backbone.name == "efficientnet_lite0"
