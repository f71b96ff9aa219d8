"""`slidepipe run` end to end: an archive of good and bad slides through tiling, extraction,
prediction and exports; reruns, a killed run, locks, max runtime, status, and an existing
cluster of separate processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import load_config
from pipelines.discovery import discover_slides
from pipelines.extract import extract_archive
from pipelines.feature_store import open_features
from pipelines.mil_run import load_mil_config, train_run
from pipelines.run.config import parse_duration
from pipelines.run.database import PathRow
from pipelines.run.inventory import take_inventory
from pipelines.run.lock import LOCK_NAME, RunLock
from pipelines.run.status import read_status
from tests import builders

runner = CliRunner()

#: The installed ``slidepipe`` entry point, run in a subprocess.
SLIDEPIPE = [sys.executable, "-m", "pipelines.launch"]
GOOD = [f"case{i:02d}" for i in range(6)]
BAD = {"empty", "no-mpp", "png-named", "truncated"}
STORE = "features_efficientnet_lite0.zarr"
#: Small chunks so a run can be killed inside a slide; one torch thread so that every run
#: (in this process, in a subprocess, on separate workers) computes bit-identical features.
SETTINGS = {"extraction": {"chunk_rows": 16}, "backbone": {"batch_size": 16},
            "cluster": {"workers": 1, "torch_threads": 1, "dashboard": None},
            "heatmap": {"top_k": 4}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve lesion-cohort slides (half with a lesion) and their labels."""
    folder = tmp_path_factory.mktemp("run-cohort")
    builders.build_lesion_cohort(folder)
    return folder


@pytest.fixture(scope="module")
def model(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ABMIL run trained on the cohort's features (three folds, a few epochs)."""
    root = tmp_path_factory.mktemp("run-model")
    config = load_config(None, {"extraction": {"chunk_rows": 64},
                                "cluster": {"workers": 1, "dashboard": None}})
    results = extract_archive(discover_slides([cohort / "labels.csv"]), config,
                              root / "features")
    assert all(r.status == "ok" for r in results), results
    (root / "mil.yaml").write_text(json.dumps({
        "labels": str(cohort / "labels.csv"), "features": str(root / "features"),
        "task": "binary", "label_names": ["negative", "positive"], "cv": {"folds": 3},
        "train": {"model": "abmil", "epochs": 8, "patience": 8, "max_instances": None},
        "evaluation": {"n_bootstrap": 10}}))
    train_run(load_mil_config(root / "mil.yaml"), root / "abmil")
    return root / "abmil"


@pytest.fixture(scope="module")
def archive(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good slides, a renamed copy of one, and five bad ones (empty, truncated, a PNG
    named .svs, no µm/px, blank glass)."""
    root = tmp_path_factory.mktemp("run-archive")
    (root / "good").mkdir()
    (root / "bad" / "deeper").mkdir(parents=True)
    for slide_id in GOOD:
        shutil.copy(cohort / f"{slide_id}.svs", root / "good")
    shutil.copy(cohort / "case00.svs", root / "bad" / "deeper" / "renamed-copy.svs")
    for build in (builders.build_zero_byte, builders.build_truncated_svs,
                  builders.build_png_named_svs, builders.build_no_mpp_tiff,
                  builders.build_blank_svs):
        build(root / "bad")
    return root


def _config(folder: Path, archive: list[Path], out: Path, model: Path, **extra: object) -> Path:
    path = folder / f"run-{out.name}.yaml"
    path.write_text(json.dumps({"archive": [str(a) for a in archive], "model": str(model),
                                "out": str(out), **SETTINGS, **extra}))
    return path


def _run(config: Path, *flags: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", str(config), *flags])
    return result.exit_code, result.output


def _stages(out: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(slide id, stage) → (status, run id) from the run database."""
    with sqlite3.connect(out / "run.db") as connection:
        rows = connection.execute("SELECT s.slide_id, t.stage, t.status, t.run_id FROM stages "
                                  "t JOIN slides s USING (slide_hash)").fetchall()
    return {(slide, stage): (status, run) for slide, stage, status, run in rows}


def _predictions(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".partial" in p.name]


@pytest.fixture(scope="module")
def reference(archive: Path, model: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, int, str]:
    """One uninterrupted run over the archive: (output folder, exit code, output)."""
    root = tmp_path_factory.mktemp("run-reference")
    code, output = _run(_config(root, [archive], root / "out", model))
    return root / "out", code, output


def test_bad_slides_are_recorded_and_the_rest_is_done(reference: tuple[Path, int, str],
                                                       archive: Path) -> None:
    out, code, output = reference
    assert code == 2, output
    stages = _stages(out)
    for slide_id in BAD:
        assert stages[(slide_id, "tile")][0] == "failed", slide_id
        assert (slide_id, "extract") not in stages
    for slide_id in GOOD:
        assert {stages[(slide_id, s)][0] for s in ("tile", "extract", "predict", "export")} \
            == {"done"}, slide_id
        assert (out / "heatmaps" / slide_id / "overlay.png").is_file()
        assert (out / "slides" / "features_efficientnet_lite0" / "h5_files" /
                f"{slide_id}.h5").is_file()
    assert stages[("blank", "extract")][0] == "done"
    assert stages[("blank", "predict")][0] == stages[("blank", "export")][0] == "skipped"
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"slides": 11, "done": 6, "no_tissue": 1, "failed": 4,
                                "quarantined": 0, "pending": 0, "running": 0}
    assert report["archive"]["paths"] == 12 and report["archive"]["copies"] == 1
    failures = {f["slide_id"]: f for f in report["failures"]}
    assert set(failures) == BAD
    assert "µm/px" in failures["no-mpp"]["error"] and "empty" in failures["empty"]["error"]
    assert (out / failures["truncated"]["traceback"]).read_text().startswith("Traceback")
    worklist = report["worklist"]
    assert [w["slide_id"] for w in worklist] == sorted(
        GOOD, key=lambda s: -float(_predictions(out)[s]["risk"]))
    assert all(w["overlay"] and w["viewer"] for w in worklist)
    assert (out / worklist[0]["viewer"]).is_file()
    assert report["stages"]["extract"]["patches"] == 6 * 64
    assert "<h2>Triage worklist</h2>" in (out / "report.html").read_text()
    assert set(_predictions(out)) == set(GOOD)
    with sqlite3.connect(out / "run.db") as connection:
        paths = connection.execute("SELECT p.path FROM slide_paths p JOIN slides s USING "
                                   "(slide_hash) WHERE s.slide_id='case00'").fetchall()
    assert sorted(Path(p).name for (p,) in paths) == ["case00.svs", "renamed-copy.svs"]
    events = [json.loads(line) for line in
              (out / "logs" / "run-00001.jsonl").read_text().splitlines()]
    assert {e.get("event") for e in events} >= {"run_planned", "stage_started",
                                                "stage_finished", "stage_failed",
                                                "run_finished"}
    assert (out / "logs" / "run-00001.log").is_file()
    assert "4 failed" in output.splitlines()[-1]
    assert not _leftovers(out)
    assert (out / LOCK_NAME).read_text() == ""


def test_second_run_processes_nothing(reference: tuple[Path, int, str], archive: Path,
                                      model: Path, tmp_path: Path) -> None:
    out = reference[0]
    complete = out / "slides" / "case01" / STORE / "_progress" / "COMPLETE.json"
    before = complete.stat().st_mtime_ns
    notify = f"cat > {tmp_path / 'stdin.txt'}; echo {{summary}} > {tmp_path / 'argument.txt'}"
    code, output = _run(_config(tmp_path, [archive], out, model), "--notify", notify)
    assert code == 0, output
    assert "0 slides processed" in output and "4 failed before" in output
    assert complete.stat().st_mtime_ns == before
    for name in ("stdin.txt", "argument.txt"):
        assert "0 slides processed" in (tmp_path / name).read_text()


def test_a_new_slide_is_the_only_one_processed(reference: tuple[Path, int, str],
                                               archive: Path, model: Path, cohort: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (tmp_path / "new").mkdir()
    shutil.copy(cohort / "case07.svs", tmp_path / "new")
    code, output = _run(_config(tmp_path, [archive, tmp_path / "new"], out, model))
    assert code == 0, output
    assert "1 slides processed (1 done" in output
    latest = max(run for _, run in _stages(out).values())
    assert {slide for (slide, _), (_, run) in _stages(out).items() if run == latest} \
        == {"case07"}
    assert set(_predictions(out)) == {*GOOD, "case07"}
    # other heatmap settings: only the export stage is redone (skipped again without tissue)
    code, output = _run(_config(tmp_path, [archive, tmp_path / "new"], out, model,
                                heatmap={"top_k": 4, "threshold": 0.5}))
    assert code == 0, output
    latest = max(run for _, run in _stages(out).values())
    redone = {(slide, stage) for (slide, stage), (_, run) in _stages(out).items()
              if run == latest}
    assert redone == {(slide, "export") for slide in [*GOOD, "case07", "blank"]}


def _count_done(out: Path, stage: str) -> int:
    """Slides done in ``stage`` (0 while the database is being created)."""
    try:
        stages = _stages(out)
    except sqlite3.Error:
        return 0
    return sum(1 for (_, name), (status, _) in stages.items()
               if name == stage and status == "done")


@pytest.mark.slow
def test_killed_run_resumes_to_identical_outputs(reference: tuple[Path, int, str],
                                                 archive: Path, model: Path,
                                                 tmp_path: Path) -> None:
    """SIGKILL the whole run (client and workers) mid-run, run again: every output equals the
    uninterrupted run's, nothing half-written or temporary is left, and the finished slides
    are not redone."""
    out = tmp_path / "out"
    config = _config(tmp_path, [archive], out, model)
    process = subprocess.Popen([*SLIDEPIPE, "run", str(config)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300

    def partway() -> bool:
        stores = list((out / "slides").glob(f"*/{STORE}"))
        underway = [s for s in stores if not (s / "_progress" / "COMPLETE.json").exists()
                    and any((s / "_progress" / "chunks").glob("*.json"))]
        return _count_done(out, "export") >= 1 and bool(underway)

    while not (out / "run.db").exists() or not partway():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = read_status(out)
    assert status["active"] and status["latest_run"]["state"] == "running"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = {slide for (slide, stage), (status, _) in _stages(out).items()
                       if stage == "export" and status == "done"}
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == process.pid
    code, output = _run(config)
    assert code == 2, output
    assert "taking over" in output and f"pid {process.pid}" in output
    stages = _stages(out)
    assert not [key for key, (status, _) in stages.items() if status in ("pending", "running")]
    redone = {slide for (slide, _), (_, run) in stages.items() if run == 2}
    assert not redone & finished_before
    reference_out = reference[0]
    for slide_id in GOOD:
        mine = open_features(out / "slides" / slide_id / STORE, verify=True)
        theirs = open_features(reference_out / "slides" / slide_id / STORE)
        np.testing.assert_array_equal(mine.features(), theirs.features())
        np.testing.assert_array_equal(mine.coords, theirs.coords)
    mine_predictions, their_predictions = _predictions(out), _predictions(reference_out)
    assert mine_predictions == their_predictions
    for slide_id, row in mine_predictions.items():
        attention = zarr.open_group(out / "slides" / slide_id / STORE, mode="r")
        reference_attention = zarr.open_group(reference_out / "slides" / slide_id / STORE,
                                              mode="r")
        np.testing.assert_array_equal(attention[row["attention"]][:],
                                      reference_attention[row["attention"]][:])
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(GOOD)
    assert not _leftovers(out)


@pytest.mark.slow
def test_max_runtime_stops_cleanly_and_the_next_run_finishes(
        reference: tuple[Path, int, str], archive: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path, [archive / "good"], out, model)
    code, output = _run(config, "--max-runtime", "1s")
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["stop_reason"] == "max_runtime"
    pending = {slide for (slide, _), (status, _) in _stages(out).items()
               if status == "pending"}
    assert pending and report["totals"]["pending"] == len(pending)
    assert not _leftovers(out)
    code, output = _run(config)
    assert code == 0, output
    assert f"{len(pending)} slides processed ({len(pending)} done" in output
    assert _predictions(out) == {k: v for k, v in _predictions(reference[0]).items()}


def test_a_second_run_on_the_same_folder_is_refused(reference: tuple[Path, int, str],
                                                    archive: Path, model: Path,
                                                    tmp_path: Path) -> None:
    out = reference[0]
    with RunLock.acquire(out):
        code, output = _run(_config(tmp_path, [archive], out, model))
    assert code == 1
    assert "in use by another slidepipe run" in output
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in output


def test_a_stale_lock_is_taken_over_and_failed_slides_are_retried(
        reference: tuple[Path, int, str], archive: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "started": "2024-05-01T18:00:00+00:00",
        "command": "slidepipe run nightly.yaml"}))
    code, output = _run(_config(tmp_path, [archive], out, model), "--retry-failed")
    assert f"pid {dead.pid} is no longer running" in output and "taking over" in output
    assert code == 2, output
    assert "4 slides processed (0 done, 4 failed" in output
    assert (out / LOCK_NAME).read_text() == ""


def test_status_reads_the_run_database(reference: tuple[Path, int, str]) -> None:
    out = reference[0]
    result = runner.invoke(app, ["status", str(out)])
    assert result.exit_code == 0, result.output
    assert "slides: 11 (6 done, 1 no tissue, 4 failed" in result.output
    assert "truncated [tile, failed]" in result.output
    found = json.loads(runner.invoke(app, ["status", str(out), "--json"]).output)
    assert found["active"] is False and found["slides"]["total"] == 11
    missing = runner.invoke(app, ["status", str(out / "nowhere")])
    assert missing.exit_code == 1 and "no slidepipe run" in missing.output


def test_inventory_deduplicates_filters_and_hashes_each_file_once(archive: Path) -> None:
    entries = discover_slides([archive])
    first = take_inventory(entries, {}, {})
    assert (first.found, len(first.slides), first.duplicates, first.hashed) == (12, 11, 1, 12)
    case00 = next(s for s in first.slides if s.slide_id == "case00")
    assert sorted(Path(p).name for p in case00.paths) == ["case00.svs", "renamed-copy.svs"]
    known_paths = {path: PathRow(path, slide.slide_hash, signature)
                   for slide in first.slides
                   for path, signature in zip(slide.paths, slide.signatures, strict=True)}
    again = take_inventory(entries, known_paths, {})
    assert again.hashed == 0 and {s.slide_hash for s in again.slides} == {
        s.slide_hash for s in first.slides}
    only = take_inventory(entries, known_paths, {}, only=["case0[12]"])
    assert sorted(s.slide_id for s in only.slides) == ["case01", "case02"]
    assert take_inventory(entries, known_paths, {}, since=datetime(2999, 1, 1)).slides == []


def test_durations_and_bad_configs(tmp_path: Path, archive: Path) -> None:
    assert parse_duration("8h") == 8 * 3600 and parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90 and parse_duration(None) is None
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("8 hours")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"archive": [str(archive)], "out": str(tmp_path / "o"),
                                  "stages": ["tile", "predict"]}))
    code, output = _run(config)
    assert code == 1 and "stages must run in order" in output
    config.write_text(json.dumps({"archive": [str(archive)], "out": str(tmp_path / "o")}))
    code, output = _run(config)
    assert code == 1 and "the predict stage needs a model" in output


def _start_cluster(folder: Path, preload: Path | None = None,
                   allowed_failures: int | None = None) -> tuple[list[subprocess.Popen], str]:
    """A `dask scheduler` and two `dask worker` processes on localhost: one model worker
    (``--resources MODEL=1``) and one CPU worker."""
    dask_cli = str(Path(sys.executable).parent / "dask")
    scheduler_file = folder / "scheduler.json"
    environment = dict(os.environ, MALLOC_ARENA_MAX="1")
    if allowed_failures is not None:
        environment["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = str(allowed_failures)
    processes = [subprocess.Popen(
        [dask_cli, "scheduler", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard"], env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    extra = ["--preload", str(preload)] if preload is not None else []
    for resources in (["--resources", "MODEL=1"], []):
        processes.append(subprocess.Popen(
            [dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
             "--no-dashboard", "--host", "127.0.0.1", *resources, *extra], env=environment,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return processes, json.loads(scheduler_file.read_text())["address"]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


@pytest.mark.slow
def test_existing_cluster_of_separate_processes_gives_identical_results(
        reference: tuple[Path, int, str], archive: Path, model: Path, tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    for name in ("case01.svs", "case02.svs"):
        shutil.copy(archive / "good" / name, tmp_path / "slides")
    shutil.copy(archive / "bad" / "truncated.svs", tmp_path / "slides")
    processes, address = _start_cluster(tmp_path)
    try:
        out = tmp_path / "out"
        code, output = _run(_config(tmp_path, [tmp_path / "slides"], out, model),
                            "--scheduler", address)
    finally:
        _stop(processes)
    assert code == 2, output
    assert f"Dask scheduler {address}" in output
    for slide_id in ("case01", "case02"):
        np.testing.assert_array_equal(
            open_features(out / "slides" / slide_id / STORE).features(),
            open_features(reference[0] / "slides" / slide_id / STORE).features())
        assert _predictions(out)[slide_id] == _predictions(reference[0])[slide_id]
    assert _stages(out)[("truncated", "tile")][0] == "failed"


FAULTS = '''
import os
import time

import wsi

if not getattr(wsi.open_slide, "test_faults", False):  # the preload may be imported twice
    _open_slide = wsi.open_slide

    def open_slide(path, *args, **kwargs):
        """Test faults: slides named hang-* never open, crash-* kill the worker process."""
        name = os.path.basename(str(path))
        if name.startswith("hang-"):
            time.sleep(3600)
        if name.startswith("crash-"):
            os._exit(13)
        return _open_slide(path, *args, **kwargs)

    open_slide.test_faults = True
    wsi.open_slide = open_slide
'''


@pytest.mark.slow
def test_hanging_and_crashing_slides_are_quarantined(cohort: Path, model: Path,
                                                     tmp_path: Path) -> None:
    """A slide that hangs is stopped by the slide timeout (its worker restarted), one that
    kills its worker is quarantined after Dask's retries; the others are done. (Tiling only:
    the timeout counts a slide's time on the workers, which worker restarts lengthen.)"""
    (tmp_path / "slides").mkdir()
    shutil.copy(cohort / "case08.svs", tmp_path / "slides" / "hang-case08.svs")
    shutil.copy(cohort / "case09.svs", tmp_path / "slides" / "crash-case09.svs")
    shutil.copy(cohort / "case10.svs", tmp_path / "slides" / "case10.svs")
    preload = tmp_path / "faults.py"
    preload.write_text(FAULTS)
    processes, address = _start_cluster(tmp_path, preload, allowed_failures=1)
    try:
        out = tmp_path / "out"
        code, output = _run(_config(tmp_path, [tmp_path / "slides"], out, model,
                                    stages=["tile"]),
                            "--scheduler", address, "--slide-timeout", "20s")
    finally:
        _stop(processes)
    assert code == 2, output
    stages = _stages(out)
    assert stages[("hang-case08", "tile")][0] == "quarantined"
    assert stages[("crash-case09", "tile")][0] == "quarantined"
    assert stages[("case10", "tile")][0] == "done"
    report = json.loads((out / "report.json").read_text())
    reasons = {f["slide_id"]: f for f in report["failures"]}
    assert reasons["hang-case08"]["kind"] == "timeout" and "timed out" in reasons[
        "hang-case08"]["error"]
    assert reasons["crash-case09"]["kind"] == "crash" and "died" in reasons[
        "crash-case09"]["error"]


DISK_FULL = '''
import errno

from pipelines.feature_store import FeatureStoreWriter

if not getattr(FeatureStoreWriter.write_chunk, "test_faults", False):
    _write_chunk = FeatureStoreWriter.write_chunk

    def write_chunk(self, index, features):
        """Test fault: the disk is full for the features of slides named full-*."""
        if "full-" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return _write_chunk(self, index, features)

    write_chunk.test_faults = True
    FeatureStoreWriter.write_chunk = write_chunk
'''


@pytest.mark.slow
def test_a_full_disk_stops_the_run_resumably(cohort: Path, model: Path, tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    shutil.copy(cohort / "case01.svs", tmp_path / "slides")
    shutil.copy(cohort / "case11.svs", tmp_path / "slides" / "full-case11.svs")
    preload = tmp_path / "disk_full.py"
    preload.write_text(DISK_FULL)
    out = tmp_path / "out"
    config = _config(tmp_path, [tmp_path / "slides"], out, model,
                     run={"max_active_slides": 1})
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        code, output = _run(config)
    assert code == 1, output
    assert "the disk is full" in output and "run again to continue" in output
    stages = _stages(out)
    assert stages[("full-case11", "extract")][0] == "pending"
    assert not [key for key, (status, _) in stages.items() if status == "running"]
    assert json.loads((out / "report.json").read_text())["run"]["stop_reason"] == "disk_full"
    code, output = _run(config)
    assert code == 0, output
    assert {status for (slide, stage), (status, _) in _stages(out).items()} == {"done"}
