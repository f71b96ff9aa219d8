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

The pieces shared with :mod:`pipelines.refine` live here: :class:`ModelEnsemble` (fold models,
their hash, class decisions), :class:`SlideContext` (a store with its slide, grid and stain
normalisation, checked against each other) and :func:`load_store_backbone`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from timm.layers import SelectAdaptivePool2d
from torch import nn

import wsi
from mil.models import MILModel
from mil.train import resolve_device
from wsi.atomic import atomic_directory
from wsi.grid_store import PROVENANCE_NAME
from wsi.tiling import GridSpec

from .backbones import Backbone, BackboneConfig, load_backbone
from .feature_store import FeatureStore, open_features
from .inference import to_model_input
from .mil_run import ensemble, feature_provenance
from .stain import StainConfig, make_stain_normaliser

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


class ExplanationError(RuntimeError):
    """A slide, store or model cannot be explained; the message names the file and the fix."""


class NotACnnError(ExplanationError):
    """The backbone has no spatial feature map to take Grad-CAM from (a vision transformer)."""


def ensemble_hash(model_hashes: Sequence[str]) -> str:
    """The identity of an ensemble, as ``slidepipe predict`` names its stored attention."""
    return hashlib.sha256("".join(model_hashes).encode()).hexdigest()[:16]


@dataclass
class ModelEnsemble:
    """MIL models applied together (the fold models of a run, or single checkpoints).

    Models are in eval mode, frozen, on ``device``; probabilities and attention are the means
    over models, as :func:`pipelines.mil_run.predict_slides` computes them.
    """

    models: list[MILModel]
    metadata: list[dict[str, Any]]
    hashes: list[str]
    device: torch.device

    @classmethod
    def load(cls, paths: Sequence[Path], device: str = "auto") -> ModelEnsemble:
        """Checkpoints, or run folders (all their ``fold_*/model.pt``), as ``predict`` takes
        them; ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``."""
        try:
            torch_device = resolve_device(device)
        except RuntimeError as error:
            raise ExplanationError(f"invalid device {device!r}: use auto, cpu or cuda[:N]"
                                   ) from error
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ExplanationError(f"device {device} asked for but CUDA is not available: use "
                                   "--device cpu or auto")
        loaded = ensemble(list(paths))
        names = {tuple(metadata["label_names"]) for _, metadata, _ in loaded}
        if len(names) > 1:
            raise ExplanationError(f"the models in {', '.join(map(str, paths))} disagree on the "
                                   f"classes ({sorted(names)}); pass models of one run")
        models = []
        for model, _, _ in loaded:
            model.eval().requires_grad_(False)
            models.append(model.to(torch_device))
        return cls(models=models, metadata=[m for _, m, _ in loaded],
                   hashes=[h for _, _, h in loaded], device=torch_device)

    @property
    def model_hash(self) -> str:
        """The ensemble's hash (names ``attention_<hash>`` and refined scores)."""
        return ensemble_hash(self.hashes)

    @property
    def label_names(self) -> list[str]:
        """Class names in index order."""
        return list(self.metadata[0]["label_names"])

    def check_store(self, store: FeatureStore) -> None:
        """Every model was trained on features made like the store's; otherwise an error."""
        found = feature_provenance(store.attrs)
        for metadata, model_hash in zip(self.metadata, self.hashes, strict=True):
            if found != metadata["feature_provenance"]:
                raise ExplanationError(
                    f"{store.path}: features made with {found}, but model {model_hash} was "
                    f"trained on {metadata['feature_provenance']}; use the model's features "
                    "(or re-extract with its backbone and grid)")

    def class_index(self, name: str) -> int:
        """The index of class ``name``; an error listing the classes otherwise."""
        if name not in self.label_names:
            raise ExplanationError(f"unknown class {name!r}; the model's classes are "
                                   f"{', '.join(self.label_names)}")
        return self.label_names.index(name)

    def predicted_class(self, probabilities: np.ndarray) -> int:
        """The predicted class of mean ``probabilities`` (C,), as ``slidepipe predict`` decides:
        the mean validation threshold on class 1 for a binary model that has one, else argmax."""
        thresholds = [m["threshold"] for m in self.metadata if m.get("threshold") is not None]
        if thresholds and len(probabilities) == 2:
            return int(probabilities[1] >= np.mean(thresholds))
        return int(np.argmax(probabilities))

    def class_logit(self, bag: torch.Tensor, class_index: int) -> torch.Tensor:
        """The mean over models of the class logit of one bag (N, D), differentiable."""
        logits = [model(bag[None]).logits[0, class_index].float() for model in self.models]
        return torch.stack(logits).mean()

    @torch.inference_mode()
    def predict(self, bag: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """Mean probabilities (C,) and each model's attention ((N,) or (C, N)) of one bag."""
        probabilities, attention = [], []
        for model in self.models:
            probs, att = model.predict(bag[None].to(self.device))
            probabilities.append(probs[0].float().cpu().numpy())
            attention.append(att[0].float().cpu().numpy())
        return np.mean(probabilities, axis=0), attention


def attention_for_class(attention: np.ndarray, class_index: int) -> np.ndarray:
    """(N,) attention of a class from (N,) single-branch or (C, N) per-class attention."""
    return attention[class_index] if attention.ndim == 2 else attention


def stored_attention(store: FeatureStore, model_hash: str) -> np.ndarray | None:
    """The ``attention_<model hash>`` array ``predict`` wrote into the store, if any."""
    group = zarr.open_group(store.path, mode="r", zarr_format=3)
    name = f"attention_{model_hash}"
    if name not in group:
        return None
    values = np.asarray(group[name][:], dtype=np.float32)
    if values.shape[-1] != store.num_patches:
        raise ExplanationError(f"{store.path}/{name} has {values.shape[-1]} values for "
                               f"{store.num_patches} patches; run slidepipe predict again")
    return values


def grid_spec(attrs: dict[str, Any], where: Path) -> GridSpec:
    """The grid a store was extracted on, from its ``grid`` attribute."""
    try:
        fields = {k: v for k, v in attrs["grid"].items() if k != "effective_mpp"}
        fields["level"] = fields.pop("patch_level")
        return GridSpec(**fields)
    except (KeyError, TypeError) as error:
        raise ExplanationError(f"{where}: the store records no usable grid ({error}); "
                               "re-extract it with this slidepipe version") from error


@dataclass
class SlideContext:
    """A complete feature store opened together with the slide it was made from.

    ``read_patches`` returns patches as extraction read them; ``model_pixels`` applies the
    store's stain normalisation (what the backbone saw).
    """

    slide_id: str
    store: FeatureStore
    slide: wsi.Slide
    spec: GridSpec
    normalise: Callable[[np.ndarray], np.ndarray] | None

    @property
    def footprint(self) -> int:
        """Level-0 side of one patch, px."""
        return self.spec.patch_size_level0

    def read_patches(self, coords: np.ndarray) -> np.ndarray:
        """(B, patch_size, patch_size, 3) uint8 patches at level-0 ``coords`` (B, 2)."""
        with wsi.PatchReader(self.slide, self.spec) as reader:
            return reader.read_batch(np.asarray(coords, dtype=np.int64).reshape(-1, 2))

    def model_pixels(self, patches: np.ndarray) -> np.ndarray:
        """``patches`` after the store's stain normalisation (unchanged without one)."""
        return self.normalise(patches) if self.normalise is not None else patches

    def close(self) -> None:
        """Close the slide."""
        self.slide.close()

    def __enter__(self) -> SlideContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mpp_override(store_path: Path) -> float | None:
    """The µm/px extraction opened the slide with when the grid used an override (the grid's
    ``provenance.json`` beside the store), as :mod:`pipelines.extract` decides it."""
    try:
        record = json.loads((store_path.parent / PROVENANCE_NAME).read_text())["provenance"]
    except (OSError, KeyError, ValueError):
        return None
    slide = record.get("slide", {})
    return float(slide["mpp_x"]) if slide.get("mpp_source") == "override" else None


def open_slide_context(store_path: Path, slide_path: Path,
                       slide_id: str | None = None) -> SlideContext:
    """Open a complete store and its slide; the slide must be the one the features were made
    from (same content hash)."""
    store_path = Path(store_path)
    store = open_features(store_path)
    attrs = store.attrs
    spec = grid_spec(attrs, store_path)
    config = attrs.get("config", {})
    backend = config.get("slides", {}).get("backend", "auto")
    slide = wsi.open_slide(slide_path, backend, mpp=_mpp_override(store_path))
    try:
        if slide.content_hash != attrs.get("slide_hash"):
            raise ExplanationError(
                f"{slide_path} is not the slide the features in {store_path} were made from "
                f"(content hash {slide.content_hash}, store {attrs.get('slide_hash')}); pass "
                "the original slide or re-extract")
        normalise = make_stain_normaliser(StainConfig.model_validate(config.get("stain", {})))
    except BaseException:
        slide.close()
        raise
    return SlideContext(slide_id=slide_id or str(attrs.get("slide_id") or store_path.parent.name),
                        store=store, slide=slide, spec=spec, normalise=normalise)


def load_store_backbone(store: FeatureStore, device: torch.device,
                        cache: dict[str, Backbone] | None = None) -> Backbone:
    """The backbone a store was extracted with (its configuration from the store's provenance)
    on ``device``, uncompiled; its weights hash must equal the store's. ``cache`` (keyed by
    configuration) spares reloading it for every slide."""
    recorded = store.attrs.get("config", {}).get("backbone")
    if not recorded:
        raise ExplanationError(f"{store.path}: the store records no backbone configuration; "
                               "re-extract it with this slidepipe version")
    config = BackboneConfig.model_validate(recorded).model_copy(
        update={"device": str(device), "compile": False})
    key = config.model_dump_json()
    backbone = cache.get(key) if cache is not None else None
    if backbone is None:
        backbone = load_backbone(config)
        if cache is not None:
            cache[key] = backbone
    if backbone.weights_hash != store.attrs.get("weights_hash"):
        raise ExplanationError(
            f"{store.path}: the backbone {config.name} loads with weights {backbone.weights_hash}"
            f", but the features were made with {store.attrs.get('weights_hash')}; restore the "
            "weights the store was extracted with (checkpoint or cache) or re-extract")
    return backbone


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


@dataclass(frozen=True)
class SlideAttention:
    """What the models say about a slide: mean probabilities, the class explained, the
    attention used to rank patches and where it came from."""

    probabilities: np.ndarray
    class_index: int
    attention: np.ndarray
    source: str


def slide_attention(context: SlideContext, models: ModelEnsemble, bag: np.ndarray,
                    class_name: str | None) -> SlideAttention:
    """Probabilities of the slide, the class (``class_name`` or the predicted one) and its (N,)
    attention: stored by ``predict`` when present, else recomputed (mean over models)."""
    probabilities, per_model = models.predict(torch.from_numpy(bag))
    index = (models.class_index(class_name) if class_name is not None
             else models.predicted_class(probabilities))
    stored = stored_attention(context.store, models.model_hash)
    if stored is not None:
        return SlideAttention(probabilities, index, attention_for_class(stored, index),
                              f"attention_{models.model_hash}")
    mean = np.mean([attention_for_class(a, index) for a in per_model], axis=0)
    return SlideAttention(probabilities, index, mean.astype(np.float32), "recomputed")


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
