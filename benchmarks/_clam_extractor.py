"""(c) of ``extract.py``: CLAM's feature extractor, re-implemented (see that script's docstring).

Coordinates come from CLAM's segmentation and ``four_pt`` contour test (``tiling.py``'s
re-implementations), per contour from its bounding-box corner, so off the slide's tile grid;
then a ``DataLoader`` over a ``Whole_Slide_Bag_FP``-style dataset reads each patch with
``openslide.OpenSlide.read_region``, transforms it with torchvision and runs the model in CLAM's
form, appending features to an HDF5 file per batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import openslide
import torch
from tiling import clam_segment, four_pt_candidate
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pipelines.backbones import load_backbone
from pipelines.config import SlidepipeConfig

#: CLAM segments at the level nearest this downsample.
CLAM_SEG_DOWNSAMPLE = 64
#: CLAM's DataLoader workers with CUDA (none without).
CLAM_CUDA_WORKERS = 8


def clam_coords(path: Path, patch: int) -> np.ndarray:
    """Level-0 patch corners made CLAM's way: segmentation at the level nearest 64x, then per
    contour a ``patch`` step from its bounding-box corner (off the tile grid), x-major."""
    with openslide.OpenSlide(str(path)) as slide:
        level = slide.get_best_level_for_downsample(CLAM_SEG_DOWNSAMPLE)
        size = slide.level_dimensions[level]
        rgb = np.asarray(slide.read_region((0, 0), level, size).convert("RGB"))
        downsample = slide.level_downsamples[level]
    contours = clam_segment(rgb, downsample, a_t=1).contours
    kept: list[tuple[int, int]] = []
    for contour, holes in zip(contours.tissue, contours.holes, strict=True):
        x, y, width, height = cv2.boundingRect(contour)
        for px in range(x, x + width, patch):
            for py in range(y, y + height, patch):
                if four_pt_candidate((px, py), holes, patch, contour) is not None:
                    kept.append((px, py))
    return np.asarray(kept, dtype=np.int64).reshape(-1, 2)


class WholeSlideBagFP(Dataset[dict[str, Any]]):
    """CLAM's ``Whole_Slide_Bag_FP``: one coordinate read from the HDF5 file per item, then
    ``read_region(...).convert("RGB")`` and the transforms. The file and the slide are opened on
    first use in each process (CLAM opens them before forking its loader workers)."""

    def __init__(self, coords_file: Path, slide_path: Path,
                 transform: transforms.Compose) -> None:
        self.coords_file, self.slide_path, self.transform = coords_file, slide_path, transform
        with h5py.File(coords_file, "r") as handle:
            self.length = len(handle["coords"])
            self.level = int(handle["coords"].attrs["patch_level"])
            self.size = int(handle["coords"].attrs["patch_size"])
        self._handle: h5py.File | None = None
        self._slide: openslide.OpenSlide | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._handle is None or self._slide is None:
            self._handle = h5py.File(self.coords_file, "r")
            self._slide = openslide.OpenSlide(str(self.slide_path))
        coord = self._handle["coords"][index]
        image = self._slide.read_region((int(coord[0]), int(coord[1])), self.level,
                                        (self.size, self.size)).convert("RGB")
        return {"img": self.transform(image), "coord": coord}


def append_hdf5(path: Path, arrays: dict[str, np.ndarray], first: bool) -> None:
    """CLAM's ``save_hdf5``: create resizable datasets on the first batch, append after."""
    with h5py.File(path, "w" if first else "a") as handle:
        for name, value in arrays.items():
            if first:
                handle.create_dataset(name, data=value, maxshape=(None, *value.shape[1:]),
                                      chunks=(1, *value.shape[1:]))
            else:
                dataset = handle[name]
                dataset.resize(len(dataset) + len(value), axis=0)
                dataset[-len(value):] = value


def clam_seconds(config: SlidepipeConfig, slide_path: Path, coords: np.ndarray, level: int,
                 patch: int, work: Path) -> float:
    """Seconds for CLAM's DataLoader loop over ``coords`` (model built beforehand)."""
    coords_file, features_file = work / "clam_coords.h5", work / "clam_features.h5"
    with h5py.File(coords_file, "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs["patch_level"] = level
        dataset.attrs["patch_size"] = patch
    backbone = load_backbone(config.backbone.model_copy(update={"channels_last": False,
                                                                "precision": "fp32"}))
    spec, device = backbone.spec, backbone.device
    transform = transforms.Compose([transforms.Resize(spec.input_size), transforms.ToTensor(),
                                    transforms.Normalize(spec.mean, spec.std)])
    cuda = device.type == "cuda"
    loader = DataLoader(WholeSlideBagFP(coords_file, slide_path, transform),
                        batch_size=backbone.batch_size,
                        num_workers=CLAM_CUDA_WORKERS if cuda else 0, pin_memory=cuda)
    model = backbone.model
    with torch.inference_mode():  # warm-up, as (b) gets
        model(torch.zeros(8, 3, spec.input_size, spec.input_size, device=device))
    start = time.perf_counter()
    first = True
    for data in loader:
        with torch.inference_mode():
            batch = data["img"].to(device, non_blocking=True)
            features = model(batch).cpu().numpy().astype(np.float32)
        append_hdf5(features_file, {"features": features,
                                    "coords": data["coord"].numpy().astype(np.int32)}, first)
        first = False
    seconds = time.perf_counter() - start
    with h5py.File(features_file, "r") as handle:
        assert handle["features"].shape == (len(coords), spec.feature_dim)
    return seconds
