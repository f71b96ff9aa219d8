"""``open_slide`` and the backend-independent :class:`Slide`.

A :class:`Slide` is what every later stage sees: geometry, resolution, a content hash and RGB
pixels (alpha composited on white, out-of-bounds areas white), identical whichever backend
(OpenSlide or tiffslide) decoded them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import BACKEND_NAMES, Backend, make_backend
from .errors import (
    ImplausibleResolutionError,
    MissingResolutionError,
    SlideOpenError,
    SlideReadError,
)
from .fingerprint import content_hash, is_url
from .resolution import (
    PLAUSIBLE_MPP,
    best_level_for_downsample,
    is_plausible_mpp,
    mpp_from_properties,
)

log = logging.getLogger(__name__)

#: Property names that may identify a patient, an operator or a case. They are hidden from every
#: export and listing unless the user explicitly asks for them.
PHI_PROPERTY_PATTERN = re.compile(
    r"(user|filename|date|time|barcode|label|macro|patient|operator|accession|comment|"
    r"imagedescription|description|name|serial|[ ._]id$|imageid|slideid|specimen)",
    re.IGNORECASE,
)

#: Pixels are read from a single-level slide in horizontal strips of at most this many pixels,
#: so a thumbnail of an unpyramided gigapixel image never needs the whole level in memory.
THUMBNAIL_STRIP_PIXELS = 16 * 1024 * 1024


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA on a white background; returns uint8 RGB."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


@dataclass
class Slide:
    """An opened whole-slide image. Create it with :func:`open_slide`."""

    path: str
    backend: Backend
    fallback_reason: str | None = None
    mpp_override: float | None = None
    _closed: bool = field(default=False, repr=False)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 first."""
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.backend.level_downsamples

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    # -- metadata ---------------------------------------------------------------------------
    @property
    def vendor(self) -> str:
        props = self.backend.properties
        return props.get("openslide.vendor") or props.get("tiffslide.vendor") or "unknown"

    @property
    def objective_power(self) -> float | None:
        props = self.backend.properties
        value = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
        try:
            return float(value) if value not in (None, "", "None") else None
        except ValueError:
            return None

    @property
    def metadata_mpp(self) -> tuple[float, float] | None:
        """µm/px (x, y) as stored in the file, ``None`` when absent."""
        return mpp_from_properties(self.backend.properties)

    @property
    def mpp(self) -> tuple[float, float]:
        """µm/px (x, y) at level 0: the override if given, else the file's metadata.

        Raises :class:`MissingResolutionError` when neither exists, and
        :class:`ImplausibleResolutionError` when the metadata is outside :data:`PLAUSIBLE_MPP`.
        """
        if self.mpp_override is not None:
            return self.mpp_override, self.mpp_override
        mpp = self.metadata_mpp
        hint = "give the resolution with --mpp, the config's slides.mpp, or an mpp override CSV"
        if mpp is None:
            raise MissingResolutionError(self.path, f"the slide has no µm/px metadata; {hint}")
        if not all(is_plausible_mpp(v) for v in mpp):
            raise ImplausibleResolutionError(
                self.path, f"the slide's µm/px {mpp[0]:.4g} x {mpp[1]:.4g} is outside the "
                f"plausible range {PLAUSIBLE_MPP}; {hint}")
        return mpp

    @property
    def level0_mpp(self) -> float:
        """The mean of x and y µm/px at level 0 (see :attr:`mpp`)."""
        mpp_x, mpp_y = self.mpp
        return (mpp_x + mpp_y) / 2.0

    @property
    def mpp_source(self) -> str:
        return "override" if self.mpp_override is not None else "metadata"

    @cached_property
    def content_hash(self) -> str:
        """Stable hash of the slide's bytes (sampled; see :mod:`wsi.fingerprint`)."""
        return content_hash(self.path)

    def properties(self, show_phi: bool = False) -> dict[str, str]:
        """Raw backend properties; identifying ones are dropped unless ``show_phi``."""
        return {k: v for k, v in sorted(self.backend.properties.items())
                if show_phi or not PHI_PROPERTY_PATTERN.search(k)}

    def summary(self) -> dict[str, Any]:
        """Non-identifying metadata for tables, logs and provenance records."""
        mpp = self.metadata_mpp if self.mpp_override is None else self.mpp
        return {
            "path": self.path,
            "backend": self.backend_name,
            "fallback_reason": self.fallback_reason,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "levels": self.level_count,
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp_x": mpp[0] if mpp else None,
            "mpp_y": mpp[1] if mpp else None,
            "mpp_source": self.mpp_source if mpp else None,
            "objective_power": self.objective_power,
        }

    # -- pixels -----------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                    ) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is ``location`` (level-0 x, y).

        Returns uint8 RGB (h, w, 3); alpha is composited on white and any part outside the slide
        is white, whatever the backend.
        """
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = int(location[0] // downsample), int(location[1] // downsample)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        inside = (round(x0 * downsample), round(y0 * downsample))
        try:
            rgba = self.backend.read_rgba(inside, level, (x1 - x0, y1 - y0))
        except Exception as error:  # backends raise their own types for corrupt data
            raise SlideReadError(self.path, f"cannot read level {level} at {inside}: "
                                 f"{type(error).__name__}: {error}; the file may be truncated "
                                 "or corrupt") from error
        if (x1 - x0, y1 - y0) == (width, height):
            return composite_on_white(rgba)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = composite_on_white(rgba)
        return out

    def best_level(self, downsample: float, tolerance: float = 0.05) -> int:
        """The coarsest level that can serve ``downsample`` without upsampling."""
        return best_level_for_downsample(self.level_downsamples, downsample, tolerance)

    def thumbnail(self, *, target_mpp: float | None = None,
                  size: tuple[int, int] | None = None) -> np.ndarray:
        """A whole-slide RGB image at ``target_mpp`` µm/px or fitting inside ``size`` (w, h).

        Read from the best pyramid level in strips (bounded memory) and area-resampled; the
        result maps to level 0 by ``dimensions / thumbnail.shape``.
        """
        if (target_mpp is None) == (size is None):
            raise ValueError("give exactly one of target_mpp or size")
        width0, height0 = self.dimensions
        if target_mpp is not None:
            downsample = max(target_mpp / self.level0_mpp, 1.0)
        else:
            assert size is not None
            downsample = max(width0 / size[0], height0 / size[1], 1.0)
        level = self.best_level(downsample)
        if abs(self.level_downsamples[level] / downsample - 1.0) <= 0.05:
            downsample = self.level_downsamples[level]  # a stored level serves it as is
        out_w, out_h = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
        level_w, level_h = self.level_dimensions[level]
        scale = level_h / out_h
        rows_per_strip = max(1, int(THUMBNAIL_STRIP_PIXELS // max(level_w * scale, 1)))
        strips = []
        for row0 in range(0, out_h, rows_per_strip):
            row1 = min(row0 + rows_per_strip, out_h)
            src0, src1 = round(row0 * scale), min(round(row1 * scale), level_h)
            ds = self.level_downsamples[level]
            strip = self.read_region((0, round(src0 * ds)), level, (level_w, max(src1 - src0, 1)))
            if strip.shape[:2] != (row1 - row0, out_w):
                strip = np.asarray(Image.fromarray(strip).resize((out_w, row1 - row0),
                                                                 Image.Resampling.BOX))
            strips.append(strip)
        return np.concatenate(strips, axis=0)

    # -- associated images (PHI) ------------------------------------------------------------
    @property
    def associated_names(self) -> tuple[str, ...]:
        return self.backend.associated_names

    def associated_image(self, name: str) -> np.ndarray:
        """The named associated image (label, macro…) as RGB. These often carry patient
        identifiers: read them only when the user asked for them."""
        if name not in self.associated_names:
            raise KeyError(f"{self.path}: no associated image {name!r}; "
                           f"available: {', '.join(self.associated_names) or 'none'}")
        return self.backend.associated_image(name)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self.backend.close()
            self._closed = True

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_readable(path: str) -> None:
    if is_url(path):
        return
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(path, "no such file; check the path")
    if p.is_dir():
        return
    try:
        with open(p, "rb") as handle:
            head = handle.read(16)
    except PermissionError as error:
        raise SlideOpenError(path, "permission denied; make the file readable for this user "
                             f"({error.strerror})") from error
    except OSError as error:
        raise SlideOpenError(path, f"cannot read the file: {error}") from error
    if not head:
        raise SlideOpenError(path, "the file is empty (0 bytes); re-export or re-copy it")


def _resolve_path(path: str) -> str:
    """A DICOM-WSI folder is opened through any one of its instances."""
    if not is_url(path) and Path(path).is_dir():
        instances = sorted(Path(path).glob("*.dcm"))
        if not instances:
            raise SlideOpenError(path, "a folder is a slide only when it holds DICOM-WSI .dcm "
                                 "files; pass slide files or a folder to search instead")
        return str(instances[0])
    return path


def _backend_order(path: str, backend: str) -> list[str]:
    if backend != "auto":
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose auto or one of "
                             f"{', '.join(BACKEND_NAMES)}")
        return [backend]
    if is_url(path):
        return ["tiffslide"]
    lower = path.lower()
    if lower.endswith((".ome.tif", ".ome.tiff", ".ome.tf8", ".ome.btf")):
        return ["tiffslide", "openslide"]
    return ["openslide", "tiffslide"]


def _probe(backend: Backend) -> None:
    """Read one small region at the coarsest level so a broken file fails at open time."""
    level = len(backend.level_dimensions) - 1
    width, height = backend.level_dimensions[level]
    if width <= 0 or height <= 0:
        raise ValueError("the slide reports an empty level")
    backend.read_rgba((0, 0), level, (min(width, 64), min(height, 64)))


def open_slide(path: str | Path, backend: str = "auto", *, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    ``backend`` is ``"auto"`` (OpenSlide first, tiffslide for OME-TIFF and URLs, each falling
    back to the other with the reason recorded in :attr:`Slide.fallback_reason`),
    ``"openslide"`` or ``"tiffslide"``. ``mpp`` overrides the file's µm/px.

    Raises :class:`SlideOpenError` naming the file and every backend's reason when none opens it.
    """
    path = str(path)
    _check_readable(path)
    target = _resolve_path(path)
    if mpp is not None and not is_plausible_mpp(mpp):
        raise ImplausibleResolutionError(path, f"the mpp override {mpp} is outside the "
                                         f"plausible range {PLAUSIBLE_MPP}")
    reasons: list[str] = []
    for name in _backend_order(target, backend):
        try:
            opened = make_backend(name, target)
        except Exception as error:  # each library raises its own types; all mean "not this one"
            reasons.append(f"{name}: {type(error).__name__}: {error}".strip())
            continue
        try:
            _probe(opened)
        except Exception as error:
            opened.close()
            reasons.append(f"{name}: cannot decode pixels: {type(error).__name__}: {error}")
            continue
        fallback = "; ".join(reasons) if reasons else None
        if fallback:
            log.info("%s: opened with %s after: %s", path, name, fallback)
        return Slide(path=path if not Path(path).is_dir() else target, backend=opened,
                     fallback_reason=fallback, mpp_override=mpp)
    size = "" if is_url(path) else f" ({os.path.getsize(target)} bytes)"
    raise SlideOpenError(path, f"not a readable slide{size}; the file may be truncated, corrupt "
                         f"or in an unsupported format. Tried {'; '.join(reasons)}")
