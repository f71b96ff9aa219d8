"""Feature store: round trip, resume after partial writes and a real SIGKILL, corruption
detection and repair, stale keys, concurrent writer processes, exports and imports."""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipelines.feature_store import (
    CorruptStoreError,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    IncompleteStoreError,
    export_hdf5,
    export_pt,
    import_h5,
    open_features,
    store_status,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
N, DIM, CHUNK = 50, 6, 8  # 7 chunks, the last one with 2 rows
GRID = {"patch_size": 224, "patch_size_level0": 448, "patch_level": 0, "target_mpp": 0.5,
        "level0_mpp": 0.25}


def reference(n: int = N, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Deterministic features, so separate processes and reruns compute the same values."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def grid_coords(n: int = N) -> np.ndarray:
    return np.stack([np.arange(n) * 448, np.arange(n) // 7 * 448], axis=1).astype(np.int64)


def open_writer(path: Path, *, key: str = "k1", n: int = N, dim: int = DIM,
                dtype: str = "float16", overwrite: bool = False) -> FeatureStoreWriter:
    return FeatureStoreWriter.open(
        path, key=key, coords=grid_coords(n), feature_dim=dim, chunk_rows=CHUNK, dtype=dtype,
        attributes={"slide_path": Path("/slides/a.svs"), "slide_sha256": "ab" * 32,
                    "backbone": {"name": "toy", "weights_sha256": "cd" * 32},
                    "grid": GRID, "resolved_config": {"batch_size": np.int64(4)}},
        overwrite=overwrite)


def write_chunks(writer: FeatureStoreWriter, values: np.ndarray,
                 indices: list[int] | None = None, pause_s: float = 0.0) -> None:
    for index in writer.pending_chunks() if indices is None else indices:
        writer.write_chunk(index, values[writer.chunk_slice(index)])
        time.sleep(pause_s)


def complete_store(path: Path, **kwargs: object) -> np.ndarray:
    seed = int(kwargs.pop("seed", 0))  # type: ignore[call-overload]
    writer = open_writer(path, **kwargs)  # type: ignore[arg-type]
    values = reference(writer.layout.num_patches, writer.layout.feature_dim, seed)
    write_chunks(writer, values)
    writer.finalize()
    return values


def chunk_file(store: Path, index: int) -> Path:
    return store / "features" / "c" / str(index) / "0"


def marker_indices(store: Path) -> list[int]:
    return sorted(int(p.stem) for p in (store / "_progress" / "chunks").glob("*.json"))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "slide.features.zarr"
    assert store_status(path, "k1") == "missing"
    values = complete_store(path)
    assert store_status(path, "k1") == "complete"
    assert store_status(path) == "complete"
    store = open_features(path, verify=True)
    assert (len(store), store.num_patches, store.feature_dim) == (N, N, DIM)
    assert store.key == "k1" and store.dtype == np.float16
    expected = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(store.features(), expected)
    assert store.features().dtype == np.float32
    assert store.features(dtype=None).dtype == np.float16
    assert np.array_equal(store.coords, grid_coords())
    assert np.array_equal(store.features(slice(3, 20)), expected[3:20])
    assert np.array_equal(store.features(slice(1, 40, 3)), expected[1:40:3])
    rows = np.array([49, 0, 17, 17, -1])
    assert np.array_equal(store.features(rows), expected[rows])
    mask = np.zeros(N, bool)
    mask[[2, 30]] = True
    assert np.array_equal(store.features(mask), expected[mask])
    assert store.features(np.array([], dtype=np.int64)).shape == (0, DIM)
    with pytest.raises(IndexError):
        store.features(np.array([N]))
    attrs = store.attrs
    assert attrs["schema"] == "slidepipe.features/1" and attrs["key"] == "k1"
    assert attrs["slide_path"] == "/slides/a.svs" and attrs["resolved_config"]["batch_size"] == 4
    assert {"created", "slidepipe_version", "layout"} <= set(attrs)
    with warnings.catch_warnings():  # bookkeeping files must not upset zarr's group listing
        warnings.simplefilter("error")
        assert set(zarr.open_group(path, mode="r").keys()) == {"features", "coords", "_progress"}
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, FeatureStore)
    assert np.array_equal(clone.features(slice(0, 5)), expected[:5])


def test_float32_is_exact_and_float16_overflow_is_refused(tmp_path: Path) -> None:
    values = complete_store(tmp_path / "f32.zarr", dtype="float32")
    store = open_features(tmp_path / "f32.zarr")
    assert store.dtype == np.float32 and np.array_equal(store.features(), values)
    writer = open_writer(tmp_path / "f16.zarr")
    with pytest.raises(FeatureStoreError, match="float16 range"):
        writer.write_chunk(0, np.full((CHUNK, DIM), 1e6, np.float32))
    with pytest.raises(ValueError, match="shape"):
        writer.write_chunk(0, np.zeros((CHUNK + 1, DIM)))
    assert writer.pending_chunks() == list(range(writer.num_chunks))


def test_resume_keeps_written_chunks(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    values = reference()
    writer = open_writer(path)
    assert writer.num_chunks == 7 and writer.chunk_slice(6) == slice(48, 50)
    write_chunks(writer, values, [0, 2, 6])
    assert store_status(path, "k1") == "incomplete"
    with pytest.raises(IncompleteStoreError) as caught:
        open_features(path)
    assert caught.value.pending == [1, 3, 4, 5]
    with pytest.raises(IncompleteStoreError):
        writer.finalize()
    kept = {i: (chunk_file(path, i).stat().st_mtime_ns, chunk_file(path, i).read_bytes())
            for i in (0, 2, 6)}
    resumed = open_writer(path)
    assert resumed.pending_chunks() == [1, 3, 4, 5]
    write_chunks(resumed, values)
    resumed.finalize()
    for index, (mtime, data) in kept.items():
        assert chunk_file(path, index).stat().st_mtime_ns == mtime
        assert chunk_file(path, index).read_bytes() == data
    complete_store(tmp_path / "ref.zarr")
    reference_store = open_features(tmp_path / "ref.zarr")
    assert np.array_equal(open_features(path, verify=True).features(), reference_store.features())


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_feature_store import open_writer, reference, write_chunks
writer = open_writer(Path({path!r}), n={n})
write_chunks(writer, reference({n}), pause_s=0.3)
"""


def test_real_sigkill_then_resume(tmp_path: Path) -> None:
    path, n = tmp_path / "killed.zarr", 12 * CHUNK
    script = KILL_SCRIPT.format(root=str(REPO_ROOT), path=str(path), n=n)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(marker_indices(path)) < 2:
            assert child.poll() is None, "writer exited before it could be killed"
            assert time.monotonic() < deadline, "writer produced no chunk markers"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    written = marker_indices(path)
    assert 2 <= len(written) < 12
    assert store_status(path, "k1") == "incomplete"
    with pytest.raises(IncompleteStoreError):
        open_features(path)
    resumed = open_writer(path, n=n)
    assert resumed.pending_chunks() == [i for i in range(12) if i not in written]
    write_chunks(resumed, reference(n))
    resumed.finalize()
    complete_store(tmp_path / "ref.zarr", n=n)
    assert np.array_equal(open_features(path, verify=True).features(dtype=None),
                          open_features(tmp_path / "ref.zarr").features(dtype=None))


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        file.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_chunk_detected_by_finalize_and_recomputed(tmp_path: Path, how: str) -> None:
    path = tmp_path / "s.zarr"
    values = reference()
    writer = open_writer(path)
    write_chunks(writer, values)
    _damage(chunk_file(path, 3), how)
    _damage(chunk_file(path, 6), how)  # the short edge chunk too
    with pytest.raises(CorruptStoreError) as caught:
        writer.finalize()
    message = str(caught.value)
    assert "chunk 3" in message and "features/c/3/0" in message and "--overwrite" in message
    assert "chunk 6: rows 48:50" in message
    assert list(caught.value.problems) == [3, 6]
    assert writer.pending_chunks() == [3, 6] and store_status(path, "k1") == "incomplete"
    rerun = open_writer(path)
    assert rerun.pending_chunks() == [3, 6]
    write_chunks(rerun, values)
    rerun.finalize()
    store = open_features(path, verify=True)
    assert np.array_equal(store.features(), values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_chunk_detected_by_verify_and_repaired_by_rerun(tmp_path: Path,
                                                                how: str) -> None:
    path = tmp_path / "s.zarr"
    values = complete_store(path)
    _damage(chunk_file(path, 5), how)
    assert store_status(path, "k1") == "complete"  # status does not re-read the features
    open_features(path)
    with pytest.raises(CorruptStoreError, match=r"chunk 5: rows 40:48, file features/c/5/0"):
        open_features(path, verify=True)
    rerun = open_writer(path)  # a rerun re-verifies and recomputes only the bad chunk
    assert rerun.pending_chunks() == [5]
    assert store_status(path, "k1") == "incomplete"
    write_chunks(rerun, values)
    rerun.finalize()
    assert np.array_equal(open_features(path, verify=True).features(),
                          values.astype(np.float16).astype(np.float32))


def test_stale_key_is_replaced_never_mixed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    complete_store(path, key="old")
    old_writer = open_writer(path, key="old")
    assert store_status(path, "new") == "stale"
    new_values = reference(seed=7)
    writer = open_writer(path, key="new")
    assert writer.pending_chunks() == list(range(7))
    assert not (path / "features" / "c").exists() and marker_indices(path) == []
    assert store_status(path, "new") == "incomplete"
    with pytest.raises(FeatureStoreError, match="replaced by another run"):
        old_writer.write_chunk(0, reference()[:CHUNK])
    with pytest.raises(FeatureStoreError, match="replaced by another run"):
        FeatureStoreWriter.attach(path, key="old")
    write_chunks(writer, new_values, [0, 1])
    with pytest.raises(IncompleteStoreError):
        open_features(path)
    write_chunks(writer, new_values)
    writer.finalize()
    store = open_features(path, verify=True)
    assert store.key == "new"
    assert np.array_equal(store.features(), new_values.astype(np.float16).astype(np.float32))
    with pytest.raises(FeatureStoreError, match="already complete"):
        writer.write_chunk(0, new_values[:CHUNK])


def test_overwrite_and_foreign_folders(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    complete_store(path)
    assert open_writer(path).pending_chunks() == []  # same key and complete: nothing to do
    assert open_writer(path, overwrite=True).pending_chunks() == list(range(7))
    assert store_status(path, "k1") == "incomplete"
    foreign = tmp_path / "notes.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert store_status(foreign) == "stale"
    with pytest.raises(FeatureStoreError, match="overwrite"):
        open_writer(foreign)
    assert (foreign / "keep.txt").exists()
    open_writer(foreign, overwrite=True)
    assert not (foreign / "keep.txt").exists()


def test_failed_creation_leaves_nothing_under_the_final_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.feature_store import writer as writer_module

    def fail(_root: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "markers_dir", fail)
    with pytest.raises(OSError, match="disk full"):
        open_writer(tmp_path / "s.zarr")
    assert list(tmp_path.iterdir()) == []


def _write_some(writer: FeatureStoreWriter | str, indices: list[int]) -> None:
    if isinstance(writer, str):  # a worker that was handed only the store's path
        writer = FeatureStoreWriter.attach(writer, key="k1")
    write_chunks(writer, reference(), indices)


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    context = multiprocessing.get_context("spawn")
    handles: list[FeatureStoreWriter | str] = [writer, str(path)]  # pickled writer, or path
    workers = [context.Process(target=_write_some, args=(handles[k], list(range(k, 7, 2))))
               for k in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert writer.pending_chunks() == []
    FeatureStoreWriter.attach(path).finalize()
    assert np.array_equal(open_features(path, verify=True).features(),
                          reference().astype(np.float16).astype(np.float32))


def test_hdf5_and_pt_exports(tmp_path: Path) -> None:
    import torch

    values = complete_store(tmp_path / "s.zarr", dtype="float32")
    store = open_features(tmp_path / "s.zarr")
    h5_path = export_hdf5(store, tmp_path / "h5_files" / "slide.h5")
    with h5py.File(h5_path, "r") as handle:
        assert handle["features"].shape == (N, DIM) and handle["features"].dtype == np.float32
        assert handle["coords"].shape == (N, 2) and handle["coords"].dtype == np.int64
        assert np.array_equal(handle["features"][()], values)
        assert np.array_equal(handle["coords"][()], grid_coords())
        assert {k: handle["coords"].attrs[k] for k in GRID} == GRID
        assert handle.attrs["key"] == "k1"
    pt_path = export_pt(store, tmp_path / "pt_files" / "slide.pt")
    tensor = torch.load(pt_path)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (N, DIM)
    assert np.array_equal(tensor.numpy(), values)
    assert [p.name for p in tmp_path.rglob(".*partial*")] == []


@pytest.mark.parametrize(("batched", "dtype"), [(False, "float32"), (True, "float32"),
                                                (True, "float16")])
def test_import_clam_h5(tmp_path: Path, batched: bool, dtype: str) -> None:
    values = reference().astype(dtype)
    coords = grid_coords()
    source = tmp_path / "clam.h5"
    with h5py.File(source, "w") as handle:
        handle["features"] = values[None] if batched else values
        handle["coords"] = coords[None] if batched else coords
        handle["coords"].attrs.update({"patch_size": 256, "patch_level": 0})
    store = import_h5(source, tmp_path / "imported.zarr", backbone="uni_v1",
                      attributes={"slide_path": "/slides/a.svs"})
    assert store_status(store.path, store.key) == "complete"
    assert store.dtype == np.dtype(dtype)
    assert np.array_equal(store.features(dtype=None), values)
    assert np.array_equal(store.coords, coords)
    assert store.attrs["provenance"].startswith("imported from ")
    assert store.attrs["grid"] == {"patch_size": 256, "patch_level": 0}
    assert store.attrs["backbone"] == "uni_v1" and store.attrs["slide_path"] == "/slides/a.svs"
    again = import_h5(source, tmp_path / "imported.zarr", backbone="uni_v1")
    assert again.key == store.key


def test_zero_patch_store(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "empty.zarr"
    writer = open_writer(path, n=0)
    assert writer.num_chunks == 0 and writer.pending_chunks() == []
    writer.finalize()
    assert store_status(path, "k1") == "complete"
    store = open_features(path, verify=True)
    assert len(store) == 0
    assert store.features().shape == (0, DIM) and store.coords.shape == (0, 2)
    with h5py.File(export_hdf5(store, tmp_path / "empty.h5"), "r") as handle:
        assert handle["features"].shape == (0, DIM) and handle["coords"].shape == (0, 2)
    assert tuple(torch.load(export_pt(store, tmp_path / "empty.pt")).shape) == (0, DIM)


def test_reader_is_lazy_about_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    complete_store(tmp_path / "s.zarr")
    store = open_features(tmp_path / "s.zarr")
    read_files: list[str] = []
    real_read_bytes = Path.read_bytes

    def spy_read(self: Path) -> bytes:
        read_files.append(self.as_posix())
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy_read)
    store.features(slice(9, 12))
    chunks = sorted(f.split("/features/c/")[1] for f in read_files if "/features/c/" in f)
    assert chunks == ["1/0"]
