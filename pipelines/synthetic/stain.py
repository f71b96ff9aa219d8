"""Stain colour of the synthetic slides: Beer-Lambert mixing of haematoxylin and eosin optical
densities, turned into RGB through a per-slide lookup table."""

from __future__ import annotations

from typing import Final

import numpy as np

#: Haematoxylin and eosin optical density per unit stain (R, G, B) and the glass's own density.
HAEMATOXYLIN_OD: Final = (0.70, 1.00, 0.33)
EOSIN_OD: Final = (0.22, 1.00, 0.55)
GLASS_OD: Final = (0.030, 0.036, 0.024)

# Lookup-table resolution: glass-noise bins x eosin bins x haematoxylin bins.
_LUT_GLASS_BINS: Final = 8
_LUT_EOSIN_BINS: Final = 160
_LUT_HAEM_BINS: Final = 160
_LUT_EOSIN_MAX: Final = 1.6
_LUT_HAEM_MAX: Final = 3.2
_GLASS_NOISE_OD: Final = 0.012


class Stain:
    """Per-slide stain intensities and the (glass, eosin, haematoxylin) → RGB lookup table.

    Attributes:
        eosin_level: Eosin density of plain stroma.
        haem_level: Scale of every nucleus's haematoxylin density.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.eosin_level = rng.uniform(0.62, 0.76)
        self.haem_level = rng.uniform(0.92, 1.08)
        eosin = np.array(EOSIN_OD) * rng.uniform(0.93, 1.07, 3)
        haem = np.array(HAEMATOXYLIN_OD) * rng.uniform(0.94, 1.06, 3)
        glass = np.linspace(-_GLASS_NOISE_OD, _GLASS_NOISE_OD, _LUT_GLASS_BINS)
        e = np.linspace(0.0, _LUT_EOSIN_MAX, _LUT_EOSIN_BINS)
        h = np.linspace(0.0, _LUT_HAEM_MAX, _LUT_HAEM_BINS)
        od = (np.array(GLASS_OD) + glass[:, None, None, None]
              + e[None, :, None, None] * eosin + h[None, None, :, None] * haem)
        rgb = np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)
        self._lut = np.ascontiguousarray(rgb.reshape(-1, 3))

    def colour(self, glass: np.ndarray, eosin: np.ndarray, haem: np.ndarray) -> np.ndarray:
        """Optical densities to uint8 RGB through the lookup table; ``glass`` is unit-variance
        noise of the glass's own density."""
        g = np.clip(glass * np.float32((_LUT_GLASS_BINS - 1) / 4.0)
                    + np.float32((_LUT_GLASS_BINS - 1) / 2.0 + 0.5), 0, _LUT_GLASS_BINS - 1)
        e = np.clip(eosin * np.float32((_LUT_EOSIN_BINS - 1) / _LUT_EOSIN_MAX) + np.float32(0.5),
                    0, _LUT_EOSIN_BINS - 1)
        h = np.clip(haem * np.float32((_LUT_HAEM_BINS - 1) / _LUT_HAEM_MAX) + np.float32(0.5),
                    0, _LUT_HAEM_BINS - 1)
        index = (g.astype(np.intp) * _LUT_EOSIN_BINS + e.astype(np.intp)) * _LUT_HAEM_BINS
        index += h.astype(np.intp)
        return np.take(self._lut, index, axis=0)

    def blend(self, glass: np.ndarray, eosin: np.ndarray, haem: np.ndarray,
              nuclear: np.ndarray, cover: np.ndarray) -> np.ndarray:
        """uint8 RGB of stroma partly covered by nuclei: the colours without and with the
        ``nuclear`` haematoxylin density, mixed by the float32 coverage ``cover``."""
        bare = self.colour(glass, eosin, haem).astype(np.float32)
        dyed = self.colour(glass, eosin, haem + nuclear).astype(np.float32)
        dyed -= bare
        dyed *= cover[..., None]
        dyed += bare
        return np.rint(dyed).astype(np.uint8)
