"""Bags of instances from a :class:`Volume`, ready for the backbone: uint8 RGB images with
their geometry.

- **Slices** (CT, MR, NIfTI): every ``slice_step``-th slice resampled to ``spacing_mm``
  in-plane (bilinear, antialiased when shrinking), cropped or padded about its centre to
  ``size`` px, displayed with the window, and put in the three channels (``context`` 0) or
  stacked with its neighbours ``i - k, i, i + k`` (2.5D). Instances keep the slice index and
  the RAS position of the slice centre; coords are ``(0, slice index)``.
- **Patches** (radiographs, ultrasound, cine): each used frame resampled to ``spacing_mm``, a
  grid of ``patch_size`` patches laid over it, and those with at least ``min_foreground`` of
  foreground kept (Otsu threshold for radiographs, non-black for ultrasound and colour). Coords
  are the patches' top-left corners in the image's own pixels (the slidepipe convention);
  instances keep frame, footprint and foreground fraction too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from .config import ImageBagSettings, VolumeBagSettings
from .volume import Volume
from .windowing import to_uint8

SLICE_COLUMNS = ("slice_index", "x_mm", "y_mm", "z_mm")
PATCH_COLUMNS = ("frame", "x_px", "y_px", "width_px", "height_px", "foreground")
#: Ultrasound / colour foreground: display value above which a pixel is not background.
NONBLACK_LEVEL = 12


@dataclass(frozen=True)
class Bag:
    """Instances of one study: ``images`` (N, H, W, 3) uint8, ``coords`` (N, 2) int64 and
    ``geometry`` (N, len(columns)) float64."""

    kind: Literal["slices", "patches"]
    images: np.ndarray
    coords: np.ndarray
    geometry: np.ndarray
    columns: tuple[str, ...]
    spacing_mm: float
    size: int

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _resample(stack: np.ndarray, factors: tuple[float, float]) -> np.ndarray:
    """(Z, H, W[, C]) float → resampled by (row, column) ``factors`` (output/input size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    channels_last = tensor.ndim == 4
    tensor = tensor.permute(0, 3, 1, 2) if channels_last else tensor[:, None]
    size = (max(1, round(tensor.shape[2] * factors[0])), max(1, round(tensor.shape[3] *
                                                                      factors[1])))
    shrinking = size[0] < tensor.shape[2] or size[1] < tensor.shape[3]
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False,
                        antialias=shrinking)
    out = out.permute(0, 2, 3, 1) if channels_last else out[:, 0]
    return out.numpy()


def _centre_fit(images: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad (Z, H, W) about the centre to (Z, size, size)."""
    out = np.zeros((images.shape[0], size, size), dtype=images.dtype)
    _, height, width = images.shape
    src_y, dst_y = max(0, (height - size) // 2), max(0, (size - height) // 2)
    src_x, dst_x = max(0, (width - size) // 2), max(0, (size - width) // 2)
    h, w = min(height, size), min(width, size)
    out[:, dst_y:dst_y + h, dst_x:dst_x + w] = images[:, src_y:src_y + h, src_x:src_x + w]
    return out


def slice_bag(volume: Volume, settings: VolumeBagSettings, window: str) -> Bag:
    """One instance per slice (or 2.5D stack), resampled to the target spacing."""
    values = volume.array.mean(axis=3) if volume.is_color else volume.array
    factors = (volume.spacing[1] / settings.spacing_mm, volume.spacing[2] / settings.spacing_mm)
    display = _centre_fit(to_uint8(volume, _resample(values, factors), window), settings.size)
    chosen = np.arange(0, volume.num_slices, settings.slice_step)
    k, last = settings.context, volume.num_slices - 1
    channels = [np.clip(chosen - k, 0, last), chosen, np.clip(chosen + k, 0, last)]
    images = np.stack([display[c] for c in channels], axis=-1)
    centres = volume.slice_centres()[chosen]
    geometry = np.column_stack([chosen.astype(np.float64), centres])
    coords = np.column_stack([np.zeros_like(chosen), chosen]).astype(np.int64)
    return Bag("slices", np.ascontiguousarray(images), coords, geometry, SLICE_COLUMNS,
               settings.spacing_mm, settings.size)


def _foreground(grey: np.ndarray, modality: str, color: bool) -> np.ndarray:
    if color or modality == "US":
        return grey > NONBLACK_LEVEL
    if grey.min() == grey.max():
        return np.zeros(grey.shape, dtype=bool)
    return grey > threshold_otsu(grey)


def _frames(count: int, wanted: int) -> np.ndarray:
    if count <= wanted:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, wanted)).astype(np.int64))


def patch_bag(volume: Volume, settings: ImageBagSettings, window: str) -> Bag:
    """Grid patches over the foreground of each used frame, at the target spacing."""
    row_mm, col_mm = volume.spacing[1], volume.spacing[2]
    factors = (row_mm / settings.spacing_mm, col_mm / settings.spacing_mm)
    size, stride = settings.patch_size, settings.patch_size - settings.overlap
    if stride < 1:
        raise ValueError(f"overlap {settings.overlap} must be smaller than the patch size {size}")
    footprint = (max(1, round(size / factors[1])), max(1, round(size / factors[0])))
    images, coords, geometry = [], [], []
    for frame in _frames(volume.num_slices, settings.max_frames):
        pixels = volume.array[frame]
        rgb = pixels if volume.is_color else to_uint8(volume, pixels, window)
        resized = np.clip(np.round(_resample(rgb[None], factors)[0]), 0, 255).astype(np.uint8)
        grey = resized.max(axis=2) if resized.ndim == 3 else resized
        mask = _foreground(grey, volume.modality, volume.is_color)
        height, width = grey.shape
        if height < size or width < size:  # pad small images up to one patch
            pad = ((0, max(0, size - height)), (0, max(0, size - width)))
            grey, mask = np.pad(grey, pad), np.pad(mask, pad)
            resized = np.pad(resized, pad + (((0, 0),) if resized.ndim == 3 else ()))
        for y in range(0, max(1, grey.shape[0] - size + 1), stride):
            for x in range(0, max(1, grey.shape[1] - size + 1), stride):
                fraction = float(mask[y:y + size, x:x + size].mean())
                if fraction < settings.min_foreground:
                    continue
                patch = resized[y:y + size, x:x + size]
                images.append(patch if patch.ndim == 3 else np.repeat(patch[..., None], 3, 2))
                x0, y0 = round(x / factors[1]), round(y / factors[0])
                coords.append((x0, y0))
                geometry.append((float(frame), x0, y0, *footprint, fraction))
    stacked = (np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8))
    return Bag("patches", stacked, np.asarray(coords, dtype=np.int64).reshape(-1, 2),
               np.asarray(geometry, dtype=np.float64).reshape(-1, len(PATCH_COLUMNS)),
               PATCH_COLUMNS, settings.spacing_mm, size)


def build_bag(volume: Volume, volume_settings: VolumeBagSettings,
              image_settings: ImageBagSettings, window: str) -> Bag:
    """Slices for cross-sectional studies, patches for radiographs and ultrasound."""
    if volume.kind == "volume":
        return slice_bag(volume, volume_settings, window)
    return patch_bag(volume, image_settings, window)
