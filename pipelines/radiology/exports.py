"""Attention exports of radiology studies: per-slice plots, overlays, attention NIfTI.

All exports are named by the study pseudonym and carry no patient identifiers: PNGs hold
pixels and the pseudonym only (no text metadata), the NIfTI holds the attention map and the
input's affine (its description field names slidepipe, nothing else).

- :func:`slice_attention_plot`: attention against slice index (volumes) as a PNG;
- :func:`key_slice_overlays`: the top-attention slices, displayed with the study's window and
  framed in the colour of their attention (PNG each);
- :func:`image_overlay`: a radiograph or ultrasound frame with the patch attention rendered
  over it (:mod:`mil.heatmap`), semi-transparent;
- :func:`attention_nifti`: per-slice attention as a volume aligned with the input (opens in
  3D Slicer / ITK-SNAP on top of the study).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from PIL import Image

from mil.heatmap import PatchSet, render
from mil.heatmap_scale import colorize, normalise
from wsi.atomic import write_bytes_atomic

from ..feature_store import FeatureStore
from .bags import PATCH_COLUMNS
from .volume import Volume
from .windowing import to_uint8

matplotlib.use("Agg")
from matplotlib import pyplot as plt

OVERLAY_ALPHA = 0.45
FRAME_PX = 8


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def slice_attention_plot(study_id: str, slice_index: np.ndarray, attention: np.ndarray,
                         path: Path) -> Path:
    """A PNG of attention (y) against slice index (x), the top slice marked."""
    figure, axes = plt.subplots(figsize=(7, 3), dpi=100)
    try:
        order = np.argsort(slice_index)
        axes.plot(slice_index[order], attention[order], marker="o", markersize=3)
        top = int(np.argmax(attention))
        axes.axvline(slice_index[top], color="tab:red", linestyle="--",
                     label=f"top slice {int(slice_index[top])}")
        axes.set_xlabel("slice index (inferior → superior along the slice normal)")
        axes.set_ylabel("attention")
        axes.set_title(study_id)
        axes.legend(loc="upper right")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _grey_display(volume: Volume, index: int, window: str) -> np.ndarray:
    pixels = volume.array[index]
    return pixels if volume.is_color else np.repeat(
        to_uint8(volume, pixels, window)[..., None], 3, axis=2)


def key_slice_overlays(volume: Volume, slice_index: np.ndarray, attention: np.ndarray,
                       folder: Path, window: str, top_k: int = 3,
                       colormap: str = "viridis") -> list[Path]:
    """The ``top_k`` slices by attention as PNGs framed in their attention colour
    (``key_slice_<rank>_z<slice>.png``); returns the paths, highest attention first."""
    scaled, _ = normalise(attention, "rank")
    colours = colorize(scaled, colormap)[:, :3]
    paths = []
    for rank, instance in enumerate(np.argsort(-attention, kind="stable")[:top_k], start=1):
        index = int(slice_index[instance])
        image = _grey_display(volume, index, window)
        framed = np.empty((image.shape[0] + 2 * FRAME_PX, image.shape[1] + 2 * FRAME_PX, 3),
                          dtype=np.uint8)
        framed[:] = colours[instance]
        framed[FRAME_PX:-FRAME_PX, FRAME_PX:-FRAME_PX] = image
        path = folder / f"key_slice_{rank}_z{index}.png"
        write_bytes_atomic(path, _png(framed))
        paths.append(path)
    return paths


def image_overlay(volume: Volume, geometry: np.ndarray, attention: np.ndarray, frame: int,
                  path: Path, window: str, colormap: str = "viridis") -> Path:
    """Frame ``frame`` of a 2D study with its patches' attention blended over it (PNG).

    ``geometry`` has the columns of :data:`~pipelines.radiology.bags.PATCH_COLUMNS`.
    """
    column = {name: i for i, name in enumerate(PATCH_COLUMNS)}
    chosen = geometry[:, column["frame"]] == frame
    if not chosen.any():
        raise ValueError(f"{volume.study_id}: no instance on frame {frame}")
    scores, _ = normalise(attention, "rank")
    coords = geometry[chosen][:, [column["x_px"], column["y_px"]]].astype(np.int64)
    footprint = (int(geometry[0, column["width_px"]]), int(geometry[0, column["height_px"]]))
    _, height, width = volume.shape
    heat = render([PatchSet(coords, scores[chosen], footprint)], 0, 0, width, height, 1.0)
    rgba = colorize(heat, colormap).astype(np.float32)
    base = _grey_display(volume, frame, window).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0 * OVERLAY_ALPHA
    blended = base * (1 - alpha) + rgba[..., :3] * alpha
    write_bytes_atomic(path, _png(np.round(blended).astype(np.uint8)))
    return path


def attention_volume(volume: Volume, slice_index: np.ndarray, attention: np.ndarray
                     ) -> np.ndarray:
    """(Z, Y, X) float32: each slice filled with its attention (0 where no instance)."""
    values = np.zeros(volume.shape, dtype=np.float32)
    values[slice_index.astype(np.int64)] = attention.astype(np.float32)[:, None, None]
    return values


def attention_nifti(volume: Volume, slice_index: np.ndarray, attention: np.ndarray,
                    path: Path) -> Path:
    """Write per-slice attention as a NIfTI on the input's grid with the input's affine."""
    data, affine = volume.to_source_grid(attention_volume(volume, slice_index, attention))
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"slidepipe attention"
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    data_bytes = image.to_bytes()
    write_bytes_atomic(path, gzip.compress(data_bytes, mtime=0) if path.name.endswith(".gz")
                       else data_bytes)
    return path


def study_attention(store: FeatureStore, name: str, predicted: int | None = None
                    ) -> np.ndarray:
    """The (N,) attention ``name`` written by ``slidepipe predict`` into ``store``: the
    predicted class's row when the model gives one per class."""
    import zarr

    group = zarr.open_group(store.path, mode="r", zarr_format=3)
    if name not in group:
        raise ValueError(f"{store.path} holds no attention {name!r}; run slidepipe predict")
    values = np.asarray(group[name][:], dtype=np.float64)
    if values.ndim == 2:
        values = values[predicted if predicted is not None else 0]
    if values.shape != (store.num_patches,):
        raise ValueError(f"{store.path}: attention {name!r} has shape {values.shape} for "
                         f"{store.num_patches} instances")
    return values


def export_study(volume: Volume, store: FeatureStore, attention: np.ndarray, folder: Path,
                 window: str, top_k: int = 3) -> list[Path]:
    """Every export of one study into ``folder``: slice plot, key slices and attention NIfTI
    for volumes; one overlay per used frame for radiographs and ultrasound."""
    import zarr

    geometry_array = zarr.open_group(store.path, mode="r", zarr_format=3)["geometry"]
    geometry = np.asarray(geometry_array[:], dtype=np.float64)
    columns = list(geometry_array.attrs["columns"])
    folder.mkdir(parents=True, exist_ok=True)
    if "slice_index" in columns:
        index = geometry[:, columns.index("slice_index")]
        return [slice_attention_plot(volume.study_id, index, attention,
                                     folder / "slice_attention.png"),
                *key_slice_overlays(volume, index, attention, folder, window, top_k),
                attention_nifti(volume, index, attention, folder / "attention.nii.gz")]
    frames = np.unique(geometry[:, columns.index("frame")]).astype(int)
    return [image_overlay(volume, geometry, attention, int(frame),
                          folder / f"overlay_frame{int(frame)}.png", window)
            for frame in frames]
