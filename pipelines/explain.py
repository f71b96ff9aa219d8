"""What explaining a slide needs, shared by Grad-CAM (:mod:`pipelines.gradcam`) and refinement
(:mod:`pipelines.refine`): :class:`ModelEnsemble` (fold models, their hash, class decisions),
:class:`SlideContext` (a store with its slide, grid and stain normalisation, checked against
each other), :func:`load_store_backbone` (the backbone a store was made with, weights checked)
and :func:`slide_attention` (the attention that ranks a slide's patches).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import wsi
from mil.models import MILModel
from mil.train import resolve_device
from wsi.grid_store import PROVENANCE_NAME
from wsi.tiling import GridSpec

from .backbones import Backbone, BackboneConfig, load_backbone
from .feature_store import FeatureStore, open_features
from .mil_run import ensemble, ensemble_hash, feature_provenance
from .stain import StainConfig, make_stain_normaliser

log = logging.getLogger(__name__)


class ExplanationError(RuntimeError):
    """A slide, store or model cannot be explained; the message names the file and the fix."""

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
