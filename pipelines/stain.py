"""Optional stain normalisation of patch batches before the backbone: Macenko and Reinhard.

Both normalisers map a batch ``(B, H, W, 3) uint8 → (B, H, W, 3) uint8`` with numpy operations
vectorised over the batch (every patch is still normalised on its own statistics), are fitted to
a target image with ``fit(target_rgb)`` and otherwise use a default H&E reference. Background
(glass) pixels, those with a low optical density (OD = -ln(I / 255)), are excluded from every
estimate; a patch with too little tissue is mapped with the reference itself (left nearly as it
is), so blank patches never produce NaNs. The Macenko stain plane is that of the uncentred OD
(the singular directions of the paper), which keeps the Beer-Lambert plane through the origin.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal, Self

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

#: Macenko reference H&E stain vectors (columns: haematoxylin, eosin; rows: R, G, B OD) and
#: 99th-percentile concentrations: the standard reference of the Macenko et al. (ISBI 2009) code,
#: reused by most implementations (it was measured with a 240 background; here OD uses 255, so
#: glass maps to pure white).
MACENKO_STAINS: Final = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
                                 dtype=np.float32)
MACENKO_MAX_CONCENTRATIONS: Final = np.array([1.9705, 1.0308], dtype=np.float32)

#: Reinhard reference: CIELAB mean and standard deviation of the tissue pixels of the OpenSlide
#: CMU-1-Small-Region H&E scan (Aperio), measured with :meth:`ReinhardNormaliser.fit`.
REINHARD_MEAN: Final = np.array([48.89, 28.17, -12.12])
REINHARD_STD: Final = np.array([20.17, 13.10, 9.98])

#: OD at or above which a channel counts as stained (below: glass / white background).
OD_THRESHOLD: Final = 0.15
#: A patch needs this fraction of tissue pixels (and at least ``MIN_TISSUE_PIXELS``) for its
#: own stain estimate; otherwise the reference is used.
MIN_TISSUE_FRACTION: Final = 0.01
MIN_TISSUE_PIXELS: Final = 50
#: Percentile of the angle distribution giving the extreme stain vectors (Macenko's alpha).
ANGLE_PERCENTILE: Final = 1.0
#: Percentile of concentrations taken as a patch's maximum concentration.
MAX_CONCENTRATION_PERCENTILE: Final = 99.0

_OD_LUT: Final = (-np.log(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)

# sRGB (D65) <-> CIELAB, in float32 (skimage's float64 conversions cost more than a backbone).
_SRGB_LEVELS: Final = np.arange(256) / 255.0
_LINEAR_LUT: Final = np.where(_SRGB_LEVELS <= 0.04045, _SRGB_LEVELS / 12.92,
                              ((_SRGB_LEVELS + 0.055) / 1.055) ** 2.4).astype(np.float32)
_RGB_TO_XYZ: Final = np.array([[0.412453, 0.357580, 0.180423],
                               [0.212671, 0.715160, 0.072169],
                               [0.019334, 0.119193, 0.950227]])
_D65_WHITE: Final = np.array([0.95047, 1.0, 1.08883])
_TO_XYZ_SCALED: Final = (_RGB_TO_XYZ / _D65_WHITE[:, None]).T.astype(np.float32)
_FROM_XYZ_SCALED: Final = (np.linalg.inv(_RGB_TO_XYZ) * _D65_WHITE[None, :]).T.astype(np.float32)
_DELTA: Final = 6.0 / 29.0


def rgb_to_lab(batch: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 sRGB → (B, H·W, 3) float32 CIELAB (D65)."""
    xyz = _LINEAR_LUT[batch.reshape(len(batch), -1, 3)] @ _TO_XYZ_SCALED
    f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(..., 3) CIELAB → (..., 3) uint8 sRGB, out-of-gamut colours clipped."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, np.maximum(fy - lab[..., 2] / 200.0, 0.0)],
                 axis=-1).astype(np.float32)
    xyz = np.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))
    linear = np.clip(xyz @ _FROM_XYZ_SCALED, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear,
                    1.055 * np.power(linear, 1 / 2.4, dtype=np.float32) - 0.055)
    return np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)


class StainConfig(BaseModel):
    """The ``stain:`` configuration section."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "macenko", "reinhard"] = "none"
    target: Path | None = None
    """An RGB image to fit the normaliser to; None: the default H&E reference."""


def _as_batch(rgb: np.ndarray) -> np.ndarray:
    batch = rgb[None] if rgb.ndim == 3 else rgb
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) or (H, W, 3) uint8 RGB, got {rgb.shape} "
                         f"{rgb.dtype}")
    return batch


def optical_density(batch: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 → (B, H·W, 3) float32 optical density -ln(max(I, 1) / 255)."""
    return _OD_LUT[batch.reshape(len(batch), -1, 3)]


def _enough_tissue(mask: np.ndarray) -> np.ndarray:
    """(B, N) tissue mask → (B,) whether each patch has enough tissue for its own estimate."""
    count = mask.sum(axis=1)
    return count >= max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * mask.shape[1])


def masked_percentiles(values: np.ndarray, mask: np.ndarray, q: list[float]) -> np.ndarray:
    """Per-row percentiles (linear interpolation) of ``values`` (B, N) over ``mask`` (B, N) →
    (len(q), B); rows without any masked value give 0."""
    ordered = np.sort(np.where(mask, values, np.inf), axis=1)
    count = mask.sum(axis=1)
    top = np.maximum(count - 1, 0)
    rows = []
    for percent in q:
        position = percent / 100.0 * top
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, top)
        a = np.take_along_axis(ordered, low[:, None], axis=1)[:, 0]
        b = np.take_along_axis(ordered, high[:, None], axis=1)[:, 0]
        with np.errstate(invalid="ignore"):
            rows.append(np.where(count > 0, a + (b - a) * (position - low), 0.0))
    return np.stack(rows).astype(values.dtype)


def _macenko_estimate(od: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch stain vectors (B, 3, 2), max concentrations (B, 2) and validity (B,)."""
    mask = (od >= OD_THRESHOLD).all(axis=2)
    ok = _enough_tissue(mask)
    # The plane of the two largest singular directions of the (uncentred) tissue OD, as in the
    # paper: Beer-Lambert OD lies in the span of the stain vectors, a plane through the origin.
    tissue = od * mask[..., None].astype(np.float32)
    moments = tissue.transpose(0, 2, 1) @ tissue
    _, vectors = np.linalg.eigh(moments.astype(np.float64))
    plane = vectors[:, :, 1:].astype(np.float32)
    plane *= np.where(plane.sum(axis=1, keepdims=True) < 0, -1.0, 1.0).astype(np.float32)
    projected = od @ plane
    angle = np.arctan2(projected[..., 1], projected[..., 0])
    low, high = masked_percentiles(angle, mask, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v_low = np.einsum("bik,bk->bi", plane, np.stack([np.cos(low), np.sin(low)], axis=1))
    v_high = np.einsum("bik,bk->bi", plane, np.stack([np.cos(high), np.sin(high)], axis=1))
    low_first = (v_low[:, 0] > v_high[:, 0])[:, None]  # haematoxylin absorbs red the most
    stains = np.stack([np.where(low_first, v_low, v_high),
                       np.where(low_first, v_high, v_low)], axis=2)
    stains = np.clip(stains, 0.0, None)
    norms = np.linalg.norm(stains, axis=1, keepdims=True)
    ok &= (norms > 1e-3).all(axis=(1, 2))
    stains = stains / np.maximum(norms, 1e-6)
    ok &= np.abs((stains[:, :, 0] * stains[:, :, 1]).sum(axis=1)) < 0.995  # two distinct stains
    stains[~ok] = MACENKO_STAINS
    concentrations = _concentrations(od, stains)
    maxima = np.stack([masked_percentiles(concentrations[..., k], mask,
                                          [MAX_CONCENTRATION_PERCENTILE])[0] for k in range(2)],
                      axis=1)
    ok &= np.isfinite(maxima).all(axis=1) & (maxima > 1e-3).all(axis=1)
    ok &= np.isfinite(stains).all(axis=(1, 2))
    stains[~ok] = MACENKO_STAINS
    maxima[~ok] = MACENKO_MAX_CONCENTRATIONS
    return stains.astype(np.float32), maxima.astype(np.float32), ok


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (B, N, 2) of OD (B, N, 3) under stains (B, 3, 2)."""
    return od @ np.linalg.pinv(stains).astype(np.float32).transpose(0, 2, 1)


class MacenkoNormaliser:
    """Macenko stain normalisation: per-patch H&E vectors from the extreme angles of the tissue
    OD in its principal plane, concentrations rescaled to the target's 99th percentiles and
    re-rendered with the target's stain vectors."""

    def __init__(self) -> None:
        self.stains = MACENKO_STAINS.copy()
        self.max_concentrations = MACENKO_MAX_CONCENTRATIONS.copy()

    def fit(self, target_rgb: np.ndarray) -> Self:
        """Take the stain vectors and maximum concentrations of an H&E target image."""
        stains, maxima, ok = _macenko_estimate(optical_density(_as_batch(target_rgb)[:1]))
        if not ok[0]:
            raise ValueError("the Macenko target has too little tissue to estimate its stains")
        self.stains, self.max_concentrations = stains[0], maxima[0]
        return self

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise a (B, H, W, 3) or (H, W, 3) uint8 batch; same shape back."""
        batch = _as_batch(rgb)
        od = optical_density(batch)
        stains, maxima, _ = _macenko_estimate(od)
        concentrations = _concentrations(od, stains)
        concentrations *= (self.max_concentrations / maxima)[:, None, :]
        rendered = 255.0 * np.exp(-concentrations @ self.stains.T)
        out = np.clip(np.rint(rendered), 0, 255).astype(np.uint8).reshape(batch.shape)
        return out if rgb.ndim == 4 else out[0]


def _reinhard_stats(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(LAB (B, N, 3), tissue weight (B, N), mean (B, 3), std (B, 3)) of tissue pixels; patches
    without enough tissue get NaN statistics."""
    lab = rgb_to_lab(batch)
    od_max = optical_density(batch).max(axis=2)
    mask = od_max >= OD_THRESHOLD
    weight = mask[:, None, :].astype(np.float32)
    count = np.maximum(mask.sum(axis=1), 1)[:, None].astype(np.float32)
    mean = (weight @ lab)[:, 0] / count
    deviation = lab - mean[:, None]
    std = np.sqrt((weight @ (deviation * deviation))[:, 0] / count)
    ok = _enough_tissue(mask)
    mean[~ok], std[~ok] = np.nan, np.nan
    # Full transform on stained pixels, none on glass, a linear ramp in between.
    ramp = np.clip((od_max - OD_THRESHOLD / 2) / (OD_THRESHOLD / 2), 0.0, 1.0)
    return lab, ramp.astype(np.float32), mean.astype(np.float64), std.astype(np.float64)


class ReinhardNormaliser:
    """Reinhard colour transfer in CIELAB: each patch's tissue mean and standard deviation per
    channel are mapped to the target's; background pixels are left as they are."""

    #: Lowest source standard deviation (LAB units) divided by, so flat patches do not explode.
    MIN_STD: Final = 1.0

    def __init__(self) -> None:
        self.mean = REINHARD_MEAN.copy()
        self.std = REINHARD_STD.copy()

    def fit(self, target_rgb: np.ndarray) -> Self:
        """Take the tissue LAB mean and standard deviation of a target image."""
        _, _, mean, std = _reinhard_stats(_as_batch(target_rgb)[:1])
        if not np.isfinite(mean).all():
            raise ValueError("the Reinhard target has too little tissue to measure its colours")
        self.mean, self.std = mean[0], std[0]
        return self

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise a (B, H, W, 3) or (H, W, 3) uint8 batch; same shape back."""
        batch = _as_batch(rgb)
        lab, ramp, mean, std = _reinhard_stats(batch)
        fallback = ~np.isfinite(mean).all(axis=1)
        mean[fallback], std[fallback] = self.mean, self.std  # identity transform
        scale = (self.std / np.maximum(std, self.MIN_STD)).astype(np.float32)
        shift = (self.mean - mean * scale).astype(np.float32)
        mapped = lab * scale[:, None] + shift[:, None]
        lab += ramp[..., None] * (mapped - lab)
        out = lab_to_rgb(lab.reshape(batch.shape))
        return out if rgb.ndim == 4 else out[0]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def make_stain_normaliser(config: StainConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """The configured normaliser (fitted to ``config.target`` when given), or None for none."""
    if config.method == "none":
        return None
    normaliser = MacenkoNormaliser() if config.method == "macenko" else ReinhardNormaliser()
    if config.target is not None:
        normaliser.fit(read_rgb(config.target))
    return normaliser
