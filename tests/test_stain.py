"""Stain normalisation on real H&E: colour shifts undone, glass kept, blank patches safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab

from pipelines.stain import (
    OD_THRESHOLD,
    MacenkoNormaliser,
    ReinhardNormaliser,
    StainConfig,
    make_stain_normaliser,
    optical_density,
)
from tests.builders import real_tissue

NORMALISERS = [MacenkoNormaliser, ReinhardNormaliser]
#: Top-left corners of tissue-rich 256 px crops of the real scan.
TISSUE_CORNERS = ((1200, 800), (1500, 1100), (2000, 1500))
#: Mixing of the R, G, B optical densities: a different stain batch / scanner.
OD_SHIFT = np.array([[1.25, 0.05, 0.0], [0.0, 0.8, 0.1], [0.05, 0.0, 1.15]], dtype=np.float32)

Normaliser = MacenkoNormaliser | ReinhardNormaliser


def crop(top: int, left: int, size: int = 256) -> np.ndarray:
    return np.ascontiguousarray(real_tissue()[top:top + size, left:left + size])


def colour_shifted(patch: np.ndarray) -> np.ndarray:
    """The patch as another lab's staining would show it: mixed optical densities (glass, with
    an OD near zero, stays glass)."""
    od = optical_density(patch[None]).reshape(patch.shape) @ OD_SHIFT
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def tissue_mask(patch: np.ndarray) -> np.ndarray:
    return (optical_density(patch[None])[0] >= OD_THRESHOLD).any(axis=1).reshape(patch.shape[:2])


def colour_distance(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean CIEDE2000 colour difference over the masked pixels."""
    return float(deltaE_ciede2000(rgb2lab(a), rgb2lab(b))[mask].mean())


@pytest.mark.parametrize("method", NORMALISERS)
@pytest.mark.parametrize("corner", TISSUE_CORNERS)
def test_fitted_normaliser_undoes_colour_shift(method: type[Normaliser],
                                               corner: tuple[int, int]) -> None:
    """Fitted to the original patch, the normaliser brings the shifted copy at least twice as
    close to the original as it was."""
    original = crop(*corner)
    shifted = colour_shifted(original)
    mask = tissue_mask(original)
    before = colour_distance(shifted, original, mask)
    after = colour_distance(method().fit(original)(shifted), original, mask)
    assert before > 10
    assert after < before / 2


@pytest.mark.parametrize("method", NORMALISERS)
def test_default_reference_makes_shifted_copies_agree(method: type[Normaliser]) -> None:
    """With the default H&E reference, a patch and its shifted copy normalise to nearly the same
    colours, and a different region of the same slide is fitted without a target."""
    normalise = method()
    original = crop(*TISSUE_CORNERS[0])
    mask = tissue_mask(original)
    before = colour_distance(colour_shifted(original), original, mask)
    after = colour_distance(normalise(colour_shifted(original)), normalise(original), mask)
    assert after < before / 3


@pytest.mark.parametrize("method", NORMALISERS)
def test_background_stays_white(method: type[Normaliser]) -> None:
    """Glass in a patch with tissue stays bright and nearly grey; blank patches (pure white,
    glass grey, almost empty) come back without NaNs or colour casts."""
    patch = crop(*TISSUE_CORNERS[0]).copy()
    patch[:64, :64] = 243  # glass of the real scan
    out = method()(patch)
    glass = out[:64, :64].astype(int)
    assert glass.min() >= 225 and (glass.max(axis=2) - glass.min(axis=2)).max() <= 12

    blanks = np.full((3, 64, 64, 3), 255, dtype=np.uint8)
    blanks[1] = 243
    blanks[2, :3, :3] = (120, 60, 160)  # 9 stained pixels: too few to estimate from
    result = method()(blanks)
    assert result.dtype == np.uint8 and result.shape == blanks.shape
    assert (result[0] >= 250).all()
    assert np.abs(result[1:, 8:, 8:].astype(int) - blanks[1:, 8:, 8:]).max() <= 6


@pytest.mark.parametrize("method", NORMALISERS)
def test_blank_target_cannot_be_fitted(method: type[Normaliser]) -> None:
    with pytest.raises(ValueError, match="too little tissue"):
        method().fit(np.full((64, 64, 3), 255, dtype=np.uint8))


@pytest.mark.parametrize("method", NORMALISERS)
def test_deterministic_and_vectorised(method: type[Normaliser]) -> None:
    """A batch of different patches (one shifted, one blank) equals the patches one by one,
    and repeated calls are identical."""
    patches = [crop(*corner) for corner in TISSUE_CORNERS]
    batch = np.stack([*patches, colour_shifted(patches[0]), np.full_like(patches[0], 255)])
    normalise = method().fit(crop(1600, 800, 512))
    together = normalise(batch)
    np.testing.assert_array_equal(together, normalise(batch))
    np.testing.assert_array_equal(together, np.stack([normalise(patch) for patch in batch]))
    np.testing.assert_array_equal(together[0], normalise(batch[0]))  # (H, W, 3) input


def test_make_stain_normaliser(tmp_path: Path) -> None:
    assert make_stain_normaliser(StainConfig()) is None
    assert isinstance(make_stain_normaliser(StainConfig(method="macenko")), MacenkoNormaliser)
    target = tmp_path / "target.png"
    Image.fromarray(crop(*TISSUE_CORNERS[1])).save(target)
    fitted = make_stain_normaliser(StainConfig(method="reinhard", target=target))
    assert isinstance(fitted, ReinhardNormaliser)
    assert not np.allclose(fitted.mean, ReinhardNormaliser().mean)
    patch = crop(*TISSUE_CORNERS[0])
    assert fitted(patch[None]).shape == (1, *patch.shape)
    with pytest.raises(ValueError):
        StainConfig.model_validate({"method": "vahadane"})
