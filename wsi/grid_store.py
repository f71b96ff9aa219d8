"""On-disk form of a tile grid: a zarr v3 group, an HDF5 ``coords`` file in the layout CLAM and
TRIDENT loaders expect, and a provenance record.

``save_grid`` writes into a folder that the caller makes atomic (see
:func:`wsi.atomic.atomic_directory`); ``load_grid`` reads the zarr group back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from .atomic import write_json_atomic
from .tiling import GridSpec, TileGrid

GRID_SCHEMA = "slidepipe.grid/1"
ZARR_NAME = "grid.zarr"
HDF5_NAME = "coords.h5"
PROVENANCE_NAME = "provenance.json"
CHUNK_ROWS = 65536


def _write_zarr(grid: TileGrid, path: Path, attributes: dict[str, Any]) -> None:
    group = zarr.open_group(path, mode="w")
    rows = max(1, min(len(grid), CHUNK_ROWS))
    group.create_array("coords", data=grid.coords.astype(np.int64), chunks=(rows, 2))
    for name, values in grid.measurements.items():
        group.create_array(name, data=values.astype(np.float32), chunks=(rows,))
    group.attrs.update(attributes)


def _write_hdf5(grid: TileGrid, path: Path, slide_name: str, level_dimensions: list[list[int]]
                ) -> None:
    spec = grid.spec
    with h5py.File(path, "w") as handle:
        coords = handle.create_dataset("coords", data=grid.coords.astype(np.int64))
        coords.attrs.update({
            "patch_size": spec.patch_size,
            "patch_size_level0": spec.patch_size_level0,
            "patch_level": spec.level,
            "downsample": [spec.level_downsample, spec.level_downsample],
            "target_mpp": spec.target_mpp,
            "level0_mpp": spec.level0_mpp,
            "overlap": spec.overlap,
            "name": slide_name,
            "level_dim": level_dimensions[spec.level],
            "level_dimensions": level_dimensions,
        })
        for name, values in grid.measurements.items():
            handle.create_dataset(name, data=values.astype(np.float32))


def save_grid(grid: TileGrid, folder: str | Path, *, slide_name: str,
              level_dimensions: list[list[int]], provenance: dict[str, Any]) -> None:
    """Write ``grid.zarr``, ``coords.h5`` and ``provenance.json`` into ``folder``."""
    folder = Path(folder)
    attributes = {"schema": GRID_SCHEMA, "spec": grid.spec.as_dict(),
                  "level0_size": list(grid.level0_size), "num_patches": len(grid),
                  "measurements": sorted(grid.measurements), "provenance": provenance}
    _write_zarr(grid, folder / ZARR_NAME, attributes)
    _write_hdf5(grid, folder / HDF5_NAME, slide_name, level_dimensions)
    write_json_atomic(folder / PROVENANCE_NAME, attributes)


def load_grid(folder: str | Path) -> TileGrid:
    """Read the grid that :func:`save_grid` wrote into ``folder``."""
    group = zarr.open_group(Path(folder) / ZARR_NAME, mode="r")
    attributes = dict(group.attrs)
    if attributes.get("schema") != GRID_SCHEMA:
        raise ValueError(f"{folder}: not a slidepipe grid (schema {attributes.get('schema')!r})")
    spec_fields = {k: v for k, v in attributes["spec"].items() if k != "effective_mpp"}
    spec_fields["level"] = spec_fields.pop("patch_level")
    return TileGrid(
        coords=np.asarray(group["coords"][:], dtype=np.int64).reshape(-1, 2),
        measurements={name: np.asarray(group[name][:], dtype=np.float32)
                      for name in attributes["measurements"]},
        spec=GridSpec(**spec_fields),
        level0_size=tuple(attributes["level0_size"]),
    )
