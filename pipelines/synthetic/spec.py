"""What one synthetic slide looks like: :class:`SyntheticSlideSpec`."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What one synthetic slide looks like; the same spec always renders the same pixels.

    Attributes:
        slide_id: Identifier, also the file stem written by :func:`write_synthetic_slide`.
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        mpp: µm per level-0 pixel; morphology (nuclei, fibres, lesions) is defined in µm.
        seed: Seed of everything random: tissue outline, stain, lesions, nuclei.
        n_lesions: Number of lesions; 0 makes a negative slide.
        tissue_fraction: Target fraction of the slide area covered by tissue.
        lesion_radius_um: Range of lesion radii in µm; lesions shrink when the tissue is too small
            to hold them.
        n_pieces: Number of tissue pieces before noise; 0 chooses 1-3 from the seed.
    """

    slide_id: str
    width: int
    height: int
    mpp: float = 0.5
    seed: int = 0
    n_lesions: int = 0
    tissue_fraction: float = 0.45
    lesion_radius_um: tuple[float, float] = (300.0, 800.0)
    n_pieces: int = 0

    def __post_init__(self) -> None:
        if not self.slide_id:
            raise ValueError("slide_id must not be empty")
        if self.width < 64 or self.height < 64:
            raise ValueError(f"slide must be at least 64 x 64 px, got {self.width} x {self.height}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.n_lesions < 0:
            raise ValueError(f"n_lesions must be >= 0, got {self.n_lesions}")
        if not 0.05 <= self.tissue_fraction <= 0.9:
            raise ValueError(f"tissue_fraction must be in [0.05, 0.9], got {self.tissue_fraction}")
        low, high = self.lesion_radius_um
        if not 0 < low <= high:
            raise ValueError(f"lesion_radius_um must be 0 < low <= high, got {(low, high)}")
        if not 0 <= self.n_pieces <= 8:
            raise ValueError(f"n_pieces must be in [0, 8], got {self.n_pieces}")

    @property
    def label(self) -> int:
        """1 for a slide with lesions, 0 otherwise."""
        return int(self.n_lesions > 0)
