"""Feature extraction end to end on a real Dask LocalCluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import wsi
from pipelines.cli import app
from pipelines.config import load_config
from pipelines.discovery import discover_slides
from pipelines.extract import (
    CPU_CHUNK_ROWS,
    GPU_CHUNK_ROWS,
    ExtractionSetup,
    extract_archive,
)
from pipelines.feature_store import open_features
from pipelines.launch import starts_local_cluster

BACKBONE = {"name": "efficientnet_lite0", "batch_size": 32}


def _config(tmp_path: Path, workers: int = 1, chunk_rows: int = 32, **extraction: object):
    return load_config(None, {"backbone": BACKBONE,
                              "cluster": {"workers": workers, "torch_threads": 1,
                                          "dashboard": None},
                              "extraction": {"chunk_rows": chunk_rows, **extraction}})


def _store(out: Path, slide_id: str) -> Path:
    return out / slide_id / "features_efficientnet_lite0.zarr"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """One uninterrupted extraction of the real SVS, shared by the checks below."""
    out = tmp_path_factory.mktemp("extract-real")
    config = _config(out)
    results = extract_archive(discover_slides([real_svs]), config, out)
    assert [r.status for r in results] == ["ok"], results
    return out


def test_features_cover_the_grid_with_provenance(real_run: Path, real_svs: Path) -> None:
    grid = wsi.load_grid(real_run / "CMU-1-Small-Region")
    store = open_features(_store(real_run, "CMU-1-Small-Region"), verify=True)
    assert len(store) == len(grid) and store.feature_dim == 1280
    np.testing.assert_array_equal(store.coords, grid.coords)
    features = store.features()
    assert np.isfinite(features).all() and features.std() > 0
    attrs = store.attrs
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["pretrained"] is True
    assert attrs["slide_hash"] == wsi.open_slide(real_svs).content_hash
    assert attrs["grid"]["patch_size"] == 256 and attrs["weights_hash"]
    assert attrs["config"]["extraction"]["chunk_rows"] == 32


def test_chunk_size_defaults_to_the_device_and_follows_the_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def rows(**extraction: object) -> int:
        config = load_config(None, {"backbone": {**BACKBONE, "pretrained": False},
                                    "extraction": extraction})
        return ExtractionSetup.create(config, tmp_path).chunk_rows

    assert rows(chunk_rows=48) == 48
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert rows() == CPU_CHUNK_ROWS == 128
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert rows() == GPU_CHUNK_ROWS == 512 and rows(chunk_rows=48) == 48


def test_hdf5_export_loads_like_clam(real_run: Path) -> None:
    path = real_run / "features_efficientnet_lite0" / "h5_files" / "CMU-1-Small-Region.h5"
    store = open_features(_store(real_run, "CMU-1-Small-Region"))
    with h5py.File(path, "r") as handle:
        assert handle["features"].shape == (len(store), 1280)
        np.testing.assert_array_equal(handle["coords"][:], store.coords)
        assert handle["coords"].attrs["patch_size"] == 256
        np.testing.assert_allclose(handle["features"][:], store.features(), rtol=1e-3)


def test_rerun_skips_finished_slides(real_run: Path, real_svs: Path) -> None:
    store = _store(real_run, "CMU-1-Small-Region")
    before = (store / "_progress" / "COMPLETE.json").stat().st_mtime_ns
    results = extract_archive(discover_slides([real_svs]), _config(real_run), real_run)
    assert [r.status for r in results] == ["cached"]
    assert (store / "_progress" / "COMPLETE.json").stat().st_mtime_ns == before


def test_one_and_two_workers_give_identical_features(real_run: Path, real_svs: Path,
                                                     tmp_path: Path) -> None:
    reference = open_features(_store(real_run, "CMU-1-Small-Region")).features()
    results = extract_archive(discover_slides([real_svs]), _config(tmp_path, workers=2),
                              tmp_path)
    assert [r.status for r in results] == ["ok"]
    np.testing.assert_array_equal(
        open_features(_store(tmp_path, "CMU-1-Small-Region")).features(), reference)


def test_bad_slides_are_recorded_and_the_rest_go_on(tmp_path: Path, real_svs: Path,
                                                    png_named_svs: Path) -> None:
    results = extract_archive(discover_slides([png_named_svs, real_svs]), _config(tmp_path),
                              tmp_path)
    by_id = {r.slide_id: r for r in results}
    assert by_id["png-named"].status == "failed" and "not a readable slide" in by_id[
        "png-named"].error
    assert by_id["CMU-1-Small-Region"].status == "ok"


def _markers(store: Path) -> list[Path]:
    return sorted((store / "_progress" / "chunks").glob("*.json"))


def test_killed_run_resumes_to_identical_features(tmp_path: Path, small_svs: Path,
                                                  real_run: Path) -> None:
    """SIGKILL the whole extraction (client and workers) mid-slide, rerun, compare with an
    uninterrupted run of the same slide."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({
        "backbone": BACKBONE, "extraction": {"chunk_rows": 16},
        "cluster": {"workers": 1, "torch_threads": 1, "dashboard": None}}))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "pipelines.launch", "extract", str(small_svs), "--config",
               str(config_file), "--out"]
    process = subprocess.Popen([*command, str(killed)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = _store(killed, small_svs.stem)
    deadline = time.monotonic() + 240
    while len(_markers(store)) < 2 if store.exists() else True:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = len(_markers(store))
    assert not (store / "_progress" / "COMPLETE.json").exists()
    resumed = subprocess.run([*command, str(killed)], capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = subprocess.run([*command, str(clean)], capture_output=True, text=True,
                                   check=False)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    a = open_features(store, verify=True)
    b = open_features(_store(clean, small_svs.stem), verify=True)
    assert written < a.num_chunks
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.coords, b.coords)


def test_cli_extract_reports_patches_per_second(tmp_path: Path, real_svs: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"cluster": {"workers": 1, "dashboard": None}}))
    result = CliRunner().invoke(app, ["extract", str(real_svs), "--out", str(tmp_path / "o"),
                                      "--config", str(config), "--backbone", "resnet50_trunc",
                                      "--random-weights", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "patches/s" in result.output
    store = open_features(tmp_path / "o" / "CMU-1-Small-Region" / "features_resnet50_trunc.zarr")
    assert store.feature_dim == 1024 and store.attrs["pretrained"] is False


def test_existing_cluster_of_separate_processes_gives_identical_features(
        tmp_path: Path, real_run: Path, real_svs: Path) -> None:
    """A real `dask scheduler` and two `dask worker` processes on localhost, as an existing
    cluster would be; the results equal the LocalCluster run's."""
    dask_cli = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen([dask_cli, "scheduler", "--scheduler-file", str(scheduler_file),
                                   "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        for _ in range(2):
            processes.append(subprocess.Popen(
                [dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--resources", "MODEL=1", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(scheduler_file.read_text())["address"]
        config = load_config(None, {"backbone": BACKBONE, "extraction": {"chunk_rows": 32},
                                    "cluster": {"scheduler": address, "torch_threads": 1}})
        results = extract_archive(discover_slides([real_svs]), config, tmp_path)
        assert [r.status for r in results] == ["ok"], results
        np.testing.assert_array_equal(
            open_features(_store(tmp_path, "CMU-1-Small-Region")).features(),
            open_features(_store(real_run, "CMU-1-Small-Region")).features())
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_import_features_cli_brings_clam_files_in(real_run: Path, tmp_path: Path) -> None:
    h5 = real_run / "features_efficientnet_lite0" / "h5_files" / "CMU-1-Small-Region.h5"
    result = CliRunner().invoke(app, ["import-features", str(h5), "--out", str(tmp_path),
                                      "--backbone", "efficientnet_lite0"])
    assert result.exit_code == 0, result.output
    imported = open_features(_store(tmp_path, "CMU-1-Small-Region"), verify=True)
    original = open_features(_store(real_run, "CMU-1-Small-Region"))
    np.testing.assert_array_equal(imported.coords, original.coords)
    np.testing.assert_allclose(imported.features(), original.features(), rtol=1e-3)
    bad = CliRunner().invoke(app, ["import-features", str(tmp_path / "missing.h5"), "--out",
                                   str(tmp_path), "--backbone", "x"])
    assert bad.exit_code == 2


def test_local_workers_are_started_for_cpu_inference() -> None:
    """LocalCluster workers get one malloc arena and no stack-sampling profiler (ADR 0004), and
    the cluster's housekeeping runs less often than Dask's defaults (LOCAL_HOUSEKEEPING)."""
    from pipelines.cluster import ClusterConfig, dask_client

    def worker_settings() -> tuple[str | None, bool]:
        import dask

        return (os.environ.get("MALLOC_ARENA_MAX"),
                bool(dask.config.get("distributed.worker.profile.enabled")))

    def intervals(dask_worker: Any) -> dict[str, float]:
        return {name: callback.callback_time
                for name, callback in dask_worker.periodic_callbacks.items()
                if name in ("tick", "monitor", "memory_monitor")}

    def scheduler_intervals(dask_scheduler: Any) -> dict[str, float]:
        return intervals(dask_scheduler)

    with dask_client(ClusterConfig(workers=1, dashboard=None)) as client:
        assert client.submit(worker_settings).result() == ("1", False)
        # Dask's housekeeping in milliseconds: worker, nanny and scheduler.
        expected = {"tick": 500, "monitor": 2000, "memory_monitor": 500}
        assert list(client.run(intervals).values()) == [expected]
        assert list(client.run(intervals, nanny=True).values()) == [expected]
        assert client.run_on_scheduler(scheduler_intervals) == {"tick": 500, "monitor": 2000}
    with dask_client(ClusterConfig(workers=1, dashboard=None, profile=True)) as client:
        assert client.submit(worker_settings).result() == ("1", True)


#: In a fresh process: start the forkserver, check it runs and left this process's environment
#: alone, then start a LocalCluster and print where its worker came from and what it inherited.
EARLY_FORKSERVER = """
import json, os, psutil
from pipelines.cluster import ClusterConfig, dask_client, start_worker_forkserver
start_worker_forkserver()
(server,) = [child for child in psutil.Process().children()
             if "forkserver" in " ".join(child.cmdline())]  # beside multiprocessing's tracker
assert "MALLOC_ARENA_MAX" not in os.environ
with dask_client(ClusterConfig(workers=1, dashboard=None)) as client:
    (worker,) = client.run(lambda: (os.getppid(), os.environ.get("MALLOC_ARENA_MAX"),
                                    os.environ.get("PYTHONHASHSEED"))).values()
print(json.dumps({"server": server.pid, "worker": worker}))
"""


def test_forkserver_started_early_forks_the_workers() -> None:
    """``slidepipe extract`` starts the workers' forkserver before its own imports: the
    LocalCluster started later forks its workers from that server, which gave them the
    environment a nanny would (one malloc arena, Dask's hash seed)."""
    # Without the variable a LocalCluster's nanny leaves in this process's environment.
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", EARLY_FORKSERVER], capture_output=True,
                          text=True, check=False, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["worker"] == [report["server"], "1", "6640"]


@pytest.mark.parametrize(("args", "starts"), [
    (["extract", "slides/", "--out", "o"], True),
    (["run", "nightly.yaml"], True),
    (["demo"], True),
    (["radiology", "extract", "ct/", "--out", "o"], True),
    (["extract", "slides/", "--scheduler", "tcp://head:8786"], False),
    (["run", "nightly.yaml", "--scheduler=tcp://head:8786"], False),
    (["extract", "--help"], False),
    (["radiology", "deidentify", "ct/", "--out", "o"], False),
    (["tile", "slides/"], False),
    ([], False),
])
def test_console_script_starts_the_forkserver_only_for_local_clusters(args: list[str],
                                                                     starts: bool) -> None:
    assert starts_local_cluster(args) is starts


@pytest.mark.parametrize(("cores", "gpus", "memory_gib", "expected"), [
    (2, 0, 24, (2, 1)),     # the CI machine: one single-threaded model worker per core
    (32, 0, 256, (8, 4)),   # many cores: at most 8 workers, the rest become torch threads
    (16, 0, 12, (4, 4)),    # little RAM: one worker per 3 GiB
    (16, 2, 64, (2, 8)),    # GPUs: one worker per GPU, whatever the cores
])
def test_default_layout_of_local_workers(monkeypatch: pytest.MonkeyPatch, cores: int, gpus: int,
                                         memory_gib: int, expected: tuple[int, int]) -> None:
    """Without a GPU, one model worker per core within the caps (ADR 0005); with GPUs one per
    GPU; the cores are shared out as torch threads; configured values win."""
    from types import SimpleNamespace

    import pipelines.cluster as cluster

    monkeypatch.setattr(cluster, "_cores", lambda: cores)
    monkeypatch.setattr(cluster, "_gpu_count", lambda: gpus)
    monkeypatch.setattr(cluster.psutil, "virtual_memory",
                        lambda: SimpleNamespace(total=memory_gib * 2**30))
    config = cluster.ClusterConfig()
    workers = cluster.default_workers(config)
    assert (workers, cluster.default_torch_threads(config, workers)) == expected
    chosen = cluster.ClusterConfig(workers=1, torch_threads=3)
    assert cluster.default_workers(chosen) == 1
    assert cluster.default_torch_threads(chosen, 1) == 3


def test_cpu_allocator_tuning_applies_with_glibc() -> None:
    """The Embedder's allocator tuning takes effect wherever glibc is the C library."""
    import platform

    from pipelines.inference import tune_cpu_allocator

    assert tune_cpu_allocator() is (platform.libc_ver()[0] == "glibc")
