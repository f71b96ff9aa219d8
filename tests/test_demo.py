"""The demo behind README's first command."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app


def _run_demo(out: Path, *args: str) -> dict[str, dict[str, str]]:
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    with open(out / "results" / "summary.csv", newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_small_demo_runs_end_to_end(tmp_path: Path) -> None:
    rows = _run_demo(tmp_path, "--slides", "2", "--size", "2048")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values())
    assert all(int(r["patches"]) > 5 for r in rows.values())
    labels = (tmp_path / "slides" / "labels.csv").read_text()
    assert "label" in labels.splitlines()[0]
    for slide_id in rows:
        folder = tmp_path / "results" / slide_id
        assert (folder / "overview.png").exists()
        assert (folder / "features_efficientnet_lite0.zarr" / "_progress" / "COMPLETE.json"
                ).exists()
    extracted = (tmp_path / "results" / "extract_summary.csv").read_text()
    assert extracted.count(",ok,") == 2


@pytest.mark.slow
def test_default_demo(tmp_path: Path) -> None:
    rows = _run_demo(tmp_path)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows.values())
    # rerunning reuses the generated cohort
    assert _run_demo(tmp_path).keys() == rows.keys()
