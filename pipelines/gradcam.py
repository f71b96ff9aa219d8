"""Grad-CAM inside the top-k patches of a slide: which pixels of a patch drove the slide's score.

Definition (Grad-CAM of Selvaraju et al., ICCV 2017, taken through a MIL model). A slide has
stored features ``X`` (N, D) (its feature store), a MIL model ``f`` (or an ensemble of fold
models) and a class ``c``. For a patch ``i``:

1. its pixels are read exactly as extraction read them: the store's grid (pyramid level, read
   size, resize to ``patch_size``) through :class:`wsi.PatchReader`, then the store's stain
   normalisation, then :func:`pipelines.inference.to_model_input` with the backbone's spec (the
   whole patch is the field of view; there is no crop);
2. the backbone (rebuilt from the store's provenance, its weights hash checked) runs in fp32 with
   gradients enabled; ``A`` (K, h, w) is its last spatial feature map, taken by a hook on the
   module that globally pools it (timm's ``global_pool``), and ``x_i`` the feature vector the
   backbone makes of it;
3. ``x_i`` replaces row ``i`` of ``X`` (the other N-1 rows stay the stored features, fixed), the
   MIL model scores this bag, and ``y_c`` is its class-``c`` logit (for an ensemble, the mean of
   its models' class-``c`` logits);
4. ``α_k = mean_(u,v) ∂y_c/∂A_k(u, v)``; ``CAM = ReLU(Σ_k α_k A_k)``, bilinearly upsampled from
   (h, w) to the patch (``patch_size`` px square) and divided by its maximum. A CAM that is zero
   everywhere stays zero: nothing in the patch raised ``y_c``; its raw maximum is reported.

The class defaults to the predicted class, decided as ``slidepipe predict`` decides it (the
mean probability's argmax, or the mean validation threshold for a binary model). The top-k
patches are those with the largest attention that ``predict`` stored in the feature store
(``attention_<model hash>``, the row of class ``c`` for models with per-class attention),
recomputed with the models when it is absent. Everything is deterministic (eval mode, fp32, no
sampling); the work runs on the CPU, or on CUDA when present (``device="auto"``).

The pieces shared with :mod:`pipelines.refine` (the model ensemble, the slide context, the
store's backbone, the ranking attention) live in :mod:`pipelines.explain`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import SelectAdaptivePool2d
from torch import nn

from wsi.atomic import atomic_directory

from .backbones import Backbone
from .explain import (
    ExplanationError,
    ModelEnsemble,
    SlideContext,
    load_store_backbone,
    slide_attention,
)
from .inference import to_model_input

log = logging.getLogger(__name__)

SCHEMA: Final = "slidepipe.gradcam/1"
INDEX_NAME: Final = "index.json"
#: Opacity of the CAM colour where the CAM is 1 (it fades with the CAM, so cold areas show the
#: tissue itself).
OVERLAY_OPACITY: Final = 0.6
#: White gap between the patch and its overlay in the side-by-side PNG, px.
PANEL_GAP: Final = 4
DEFINITION: Final = (
    "Grad-CAM (Selvaraju et al. 2017) through the MIL model: the patch's features are recomputed "
    "from its pixels (extraction's reading and preprocessing), substituted for its instance in "
    "the slide's bag (other instances: stored features), the class logit is backpropagated to "
    "the backbone's last spatial feature map A; CAM = ReLU(sum_k alpha_k A_k) with alpha_k the "
    "spatial mean of d logit / d A_k, bilinearly upsampled to the patch, divided by its maximum.")


class NotACnnError(ExplanationError):
    """The backbone has no spatial feature map to take Grad-CAM from (a vision transformer)."""


def _final_pool(model: nn.Module) -> nn.Module | None:
    """The module that globally pools the backbone's last spatial map: timm's ``global_pool``
    (``head.global_pool`` for ConvNeXt-style heads), else the last adaptive pooling layer."""
    named = dict(model.named_modules())
    for name in ("global_pool", "head.global_pool"):
        if isinstance(named.get(name), nn.Module):
            return named[name]
    pools = [module for module in named.values() if isinstance(
        module, SelectAdaptivePool2d | nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)]
    return pools[-1] if pools else None


def _not_a_cnn(name: str, why: str) -> NotACnnError:
    return NotACnnError(
        f"Grad-CAM needs a CNN backbone with a spatial feature map; {name} {why} (a vision "
        "transformer or foundation model). Use the attention heatmap of its MIL model "
        "instead, or extract features with a CNN backbone (efficientnet_lite0, resnet50_trunc "
        "or a timm CNN) for Grad-CAM")


class FeatureMapTap:
    """Runs a CNN backbone in fp32 and exposes its last spatial feature map as a leaf tensor
    that requires gradients: a forward pre-hook on the global pooling module swaps the pooling
    input for a detached copy, so gradients stop there and nothing earlier is recorded."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        pool = _final_pool(backbone.model)
        if pool is None:
            raise _not_a_cnn(backbone.spec.name, "has no global pooling layer")
        self._pool = pool
        inner_dim = getattr(getattr(pool, "pool", pool), "dim", (2, 3))
        self._channels_last_layout = tuple(inner_dim) == (1, 2)  # timm NHWC pooling
        self._maps: list[torch.Tensor] = []

    def _capture(self, _module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        leaf = inputs[0].detach().float().requires_grad_(True)
        self._maps.append(leaf)
        return (leaf, *inputs[1:])

    def __call__(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 model pixels → features (B, D) with their graph, and the leaf
        feature map, always (B, K, h, w)."""
        backbone = self.backbone
        patches = torch.from_numpy(np.ascontiguousarray(pixels)).to(backbone.device)
        x = to_model_input(patches, backbone.spec, backbone.config.channels_last)
        self._maps.clear()
        handle = self._pool.register_forward_pre_hook(self._capture)
        try:
            with torch.enable_grad():
                features = backbone.model(x)
        finally:
            handle.remove()
        if len(self._maps) != 1 or self._maps[0].ndim != 4:
            shapes = [tuple(m.shape) for m in self._maps]
            raise _not_a_cnn(backbone.spec.name, f"pools tensors of shapes {shapes}, not one "
                                                 "spatial (B, K, h, w) map")
        feature_map = self._maps[0]
        if features.ndim != 2 or features.shape[1] != backbone.spec.feature_dim:
            raise ExplanationError(f"{backbone.spec.name} returned {tuple(features.shape)}, "
                                   f"expected (B, {backbone.spec.feature_dim})")
        if self._channels_last_layout:
            feature_map = feature_map.permute(0, 3, 1, 2)
        return features.float(), feature_map


@dataclass(frozen=True)
class CamBatch:
    """Grad-CAMs of some patches of one bag."""

    cams: np.ndarray
    """(k, H, W) float32 in [0, 1], at the patch's pixel size."""
    raw_max: np.ndarray
    """(k,) maximum of each CAM before normalisation (0: no positive evidence)."""
    features: np.ndarray
    """(k, D) float32 features recomputed from the pixels."""


def cam_from_gradients(feature_map: torch.Tensor, gradients: torch.Tensor,
                       size: int) -> tuple[np.ndarray, float]:
    """ReLU(Σ_k α_k A_k) for one (K, h, w) map and its gradients, upsampled to ``size`` px
    square and divided by its maximum; returns (CAM, raw maximum)."""
    weights = gradients.float().mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * feature_map.float()).sum(dim=0))
    upsampled = F.interpolate(cam[None, None], size=(size, size), mode="bilinear",
                              align_corners=False)[0, 0].clamp_(min=0.0)
    peak = float(upsampled.max())
    if peak > 0.0:
        upsampled = upsampled / peak
    return upsampled.detach().cpu().numpy().astype(np.float32), peak


def grad_cam(tap: FeatureMapTap, models: ModelEnsemble, bag: np.ndarray, rows: Sequence[int],
             pixels: np.ndarray, class_index: int) -> CamBatch:
    """Grad-CAM of patches ``pixels`` (k, H, W, 3) uint8 (model pixels: stain-normalised like
    extraction) standing for instances ``rows`` of ``bag`` (N, D) float32; see the module
    docstring for the definition."""
    if len(rows) != len(pixels):
        raise ValueError(f"{len(rows)} rows for {len(pixels)} patches")
    if bag.ndim != 2 or bag.shape[1] != tap.backbone.spec.feature_dim:
        raise ValueError(f"bag of shape {bag.shape} does not hold {tap.backbone.spec.name} "
                         f"features ({tap.backbone.spec.feature_dim}-d)")
    fixed = torch.from_numpy(np.ascontiguousarray(bag, dtype=np.float32)).to(models.device)
    cams, peaks, features = [], [], []
    for row, patch in zip(rows, pixels, strict=True):
        with torch.enable_grad():
            vector, feature_map = tap(patch[None])
            substituted = fixed.index_put((torch.tensor([int(row)], device=fixed.device),),
                                          vector.to(fixed.device))
            logit = models.class_logit(substituted, class_index)
            (gradients,) = torch.autograd.grad(logit, feature_map)
        cam, peak = cam_from_gradients(feature_map[0].detach(), gradients[0], patch.shape[0])
        cams.append(cam)
        peaks.append(peak)
        features.append(vector.detach().cpu().numpy()[0])
    size = pixels.shape[1] if len(pixels) else 0
    return CamBatch(cams=np.stack(cams) if cams else np.zeros((0, size, size), np.float32),
                    raw_max=np.asarray(peaks, dtype=np.float32),
                    features=np.stack(features) if features else
                    np.zeros((0, bag.shape[1]), np.float32))


def overlay_panel(patch: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The patch and its CAM overlay (jet colours, opacity growing with the CAM) side by side
    with a white gap: (H, 2W + gap, 3) uint8."""
    from matplotlib import colormaps

    colours = colormaps["jet"](cam)[..., :3].astype(np.float32) * 255.0
    opacity = (OVERLAY_OPACITY * cam)[..., None]
    blended = (1.0 - opacity) * patch.astype(np.float32) + opacity * colours
    gap = np.full((patch.shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([patch, gap, np.clip(np.rint(blended), 0, 255).astype(np.uint8)],
                          axis=1)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def explain_slide(context: SlideContext, models: ModelEnsemble, out: Path, *, top_k: int = 8,
                  class_name: str | None = None,
                  backbones: dict[str, Backbone] | None = None) -> Path:
    """Grad-CAM of the ``top_k`` most attended patches of a slide, written atomically to
    ``out/<slide_id>/``: per patch ``rank<r>_x<x>_y<y>.png`` (the patch as read, before any
    stain normalisation | its CAM overlay) and ``….npy`` (the CAM, float32 [0, 1]), and
    ``index.json`` (rank, store row, level-0 x/y, attention, CAM maximum, recomputed-feature
    difference; footprint, class, model hash). Returns the slide's folder."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    models.check_store(context.store)
    backbone = load_store_backbone(context.store, models.device, backbones)
    tap = FeatureMapTap(backbone)
    bag = context.store.features()
    ranked = slide_attention(context, models, bag, class_name)
    order = np.argsort(-ranked.attention, kind="stable")[:top_k]
    coords = context.store.coords[order]
    patches = context.read_patches(coords)
    result = grad_cam(tap, models, bag, order.tolist(), context.model_pixels(patches),
                      ranked.class_index)
    entries = []
    with atomic_directory(Path(out) / context.slide_id) as folder:
        for rank, (row, (x, y)) in enumerate(zip(order.tolist(), coords.tolist(),
                                                 strict=True), start=1):
            stem = f"rank{rank:02d}_x{x}_y{y}"
            cam = result.cams[rank - 1]
            (folder / f"{stem}.png").write_bytes(_png_bytes(overlay_panel(patches[rank - 1],
                                                                          cam)))
            (folder / f"{stem}.npy").write_bytes(_npy_bytes(cam))
            entries.append({
                "rank": rank, "row": row, "x": x, "y": y,
                "attention": float(ranked.attention[row]), "png": f"{stem}.png",
                "cam": f"{stem}.npy", "cam_raw_max": float(result.raw_max[rank - 1]),
                "feature_max_abs_diff": float(np.abs(result.features[rank - 1] - bag[row]).max()),
            })
        index = {
            "schema": SCHEMA, "slide_id": context.slide_id, "definition": DEFINITION,
            "model_hash": models.model_hash, "models": models.hashes,
            "class": models.label_names[ranked.class_index], "class_index": ranked.class_index,
            "probabilities": {name: float(p) for name, p in
                              zip(models.label_names, ranked.probabilities, strict=True)},
            "attention_source": ranked.source, "top_k": top_k,
            "footprint_level0": context.footprint, "patch_size": context.spec.patch_size,
            "target_mpp": context.spec.target_mpp, "backbone": backbone.spec.name,
            "weights_hash": backbone.weights_hash, "device": str(models.device),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "patches": entries,
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    log.info("%s: Grad-CAM of %d patches (class %s) in %s", context.slide_id, len(entries),
             index["class"], Path(out) / context.slide_id)
    return Path(out) / context.slide_id
