"""Slide-reading backends behind one small interface.

A backend only answers what the file says: level geometry, raw properties, pixels of an
in-bounds region as RGBA, and associated images. Everything the pipeline relies on (mpp
normalisation, white padding, compositing, hashing) lives in :mod:`wsi.slide`, so every backend
behaves the same from the outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

BACKEND_NAMES = ("openslide", "tiffslide")


class Backend(Protocol):
    """What :class:`wsi.slide.Slide` needs from a slide library."""

    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    associated_names: tuple[str, ...]

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Return the ``(h, w, 4)`` uint8 straight-alpha RGBA region (in-bounds requests only)."""
        ...

    def associated_image(self, name: str) -> np.ndarray:
        """Return the named associated image (label, macro, thumbnail) as RGB uint8."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def _to_rgba(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 3:
        alpha = np.full((*array.shape[:2], 1), 255, dtype=np.uint8)
        array = np.concatenate([array, alpha], axis=2)
    return np.ascontiguousarray(array, dtype=np.uint8)


class OpenSlideBackend:
    """libopenslide 4 (from openslide-bin): SVS, NDPI, MRXS, SCN, BIF, generic TIFF, DICOM-WSI."""

    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.associated_names = tuple(self._slide.associated_images.keys())

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # openslide-python un-premultiplies ARGB, so the alpha returned is straight alpha.
        return np.asarray(self._slide.read_region(location, level, size), dtype=np.uint8)

    def associated_image(self, name: str) -> np.ndarray:
        return np.asarray(self._slide.associated_images[name].convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    """tiffslide (pure Python over tifffile): TIFF-based formats, OME-TIFF, and fsspec URLs."""

    name = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
        self.associated_names = tuple(self._slide.associated_images.keys())

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        array = self._slide.read_region(location, level, size, as_array=True)
        return _to_rgba(np.asarray(array))

    def associated_image(self, name: str) -> np.ndarray:
        image = self._slide.associated_images[name]
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def make_backend(name: str, path: str) -> Backend:
    """Open ``path`` with the backend called ``name`` (one of :data:`BACKEND_NAMES`)."""
    if name == "openslide":
        return OpenSlideBackend(path)
    if name == "tiffslide":
        return TiffSlideBackend(path)
    raise ValueError(f"unknown slide backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
