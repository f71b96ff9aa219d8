"""Heatmap refinement: features at overlap inside a slide's top regions, scored in context.

A heatmap from the extraction grid has the grid's resolution: one value per patch footprint.
Refinement samples the regions that matter more finely, at a bounded cost:

1. **Regions**: the neighbourhoods of the ``top_k`` most attended patches (or of every patch
   whose attention is at least ``above`` times the slide's maximum): each selected footprint
   grown by ``neighbourhood`` grid steps on every side, clipped to the slide.
2. **New coordinates**: level-0 positions on a finer stride (``overlap`` 0.5: half the
   footprint) counted from the slide origin like the grid, whose whole footprint lies inside a
   region and inside the slide, and which the grid's own tissue rules would keep (tissue
   detection with the store's settings, ``min_tissue_fraction`` / ``max_pen_fraction`` at the
   finer stride, pixel QC when the grid used it).
3. **Features**: positions already in the store keep their stored features; the others are read,
   stain-normalised and embedded in-process exactly as extraction did (same grid reader, same
   backbone with its weights hash checked, same precision), in batches, and rounded through the
   store's dtype. The models must have been trained on the store's features.
4. **Scores**: the MIL models score one bag, the original instances plus the new ones, so every
   score comes from the same softmax; each model's attention is divided by the sum of its
   attention over the original instances, which puts the scores on the scale of the stored
   attention (for attention-pooling models, original instances get exactly their stored
   attention), then averaged over models.

The result, ``(coords (M, 2) int64 level-0, scores (M,) float32, footprint level-0 px)`` for
every refined position (stored ones inside the regions included), is saved atomically in the
slide's store as the zarr group ``refined_<model hash>`` (arrays ``coords`` and ``scores``, the
settings in its attributes), ready to be merged into a heatmap by overlap averaging.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import torch
import zarr

import wsi
from wsi.atomic import atomic_directory

from .backbones import Backbone
from .explain import (
    ExplanationError,
    ModelEnsemble,
    SlideContext,
    attention_for_class,
    load_store_backbone,
    open_slide_context,
    slide_attention,
)
from .inference import Embedder

log = logging.getLogger(__name__)

SCHEMA: Final = "slidepipe.refined/1"
PREFIX: Final = "refined_"


class RefinedHeatmap(NamedTuple):
    """Refined scores of a slide: level-0 top-left ``coords`` (M, 2) int64, ``scores`` (M,)
    float32 on the stored attention's scale, and the level-0 ``footprint`` of each patch."""

    coords: np.ndarray
    scores: np.ndarray
    footprint: int


def refined_name(model_hash: str) -> str:
    """Name of the group holding a model's refined scores inside a feature store."""
    return f"{PREFIX}{model_hash}"


def select_regions(coords: np.ndarray, attention: np.ndarray, *, footprint: int, step: int,
                   level0_size: tuple[int, int], top_k: int | None = 8,
                   above: float | None = None, neighbourhood: int = 1) -> np.ndarray:
    """Region boxes (R, 4) int64 ``x0, y0, x1, y1`` (level 0, end exclusive): the footprints of
    the ``top_k`` most attended patches, or (``above`` given) of the patches whose attention is
    at least ``above`` times the maximum, grown by ``neighbourhood`` steps, clipped to the
    slide."""
    if neighbourhood < 0:
        raise ValueError(f"neighbourhood must be >= 0, got {neighbourhood}")
    if above is not None:
        if not 0.0 < above <= 1.0:
            raise ValueError(f"above must be in (0, 1], a fraction of the maximum; got {above}")
        chosen = np.flatnonzero(attention >= above * attention.max())
    elif top_k is not None and top_k >= 1:
        chosen = np.argsort(-attention, kind="stable")[:top_k]
    else:
        raise ValueError("give top_k >= 1 or above to select the regions to refine")
    margin = neighbourhood * step
    corners = coords[chosen].astype(np.int64)
    width, height = level0_size
    return np.column_stack([np.maximum(corners[:, 0] - margin, 0),
                            np.maximum(corners[:, 1] - margin, 0),
                            np.minimum(corners[:, 0] + footprint + margin, width),
                            np.minimum(corners[:, 1] + footprint + margin, height)])


def fine_positions(boxes: np.ndarray, *, stride: int, footprint: int) -> np.ndarray:
    """Level-0 corners (M, 2) int64 on multiples of ``stride`` whose ``footprint`` square lies
    inside at least one box, unique, in row-major order (by y, then x)."""
    parts = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).tolist():
        xs = np.arange(-(-x0 // stride) * stride, x1 - footprint + 1, stride, dtype=np.int64)
        ys = np.arange(-(-y0 // stride) * stride, y1 - footprint + 1, stride, dtype=np.int64)
        if len(xs) and len(ys):
            grid_x, grid_y = np.meshgrid(xs, ys)
            parts.append(np.column_stack([grid_x.ravel(), grid_y.ravel()]))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    unique = np.unique(np.concatenate(parts), axis=0)
    return unique[np.lexsort((unique[:, 0], unique[:, 1]))]


def _keys(coords: np.ndarray, width: int) -> np.ndarray:
    """One int64 per (x, y) position, for set operations on coordinates."""
    return coords[:, 1].astype(np.int64) * (int(width) + 1) + coords[:, 0].astype(np.int64)


def _tissue_positions(context: SlideContext, stride: int) -> np.ndarray:
    """Every position on the fine stride that the grid's tissue rules keep (whole slide; cheap
    array operations on the tissue mask)."""
    attrs = context.store.attrs
    config = attrs.get("config", {})
    tissue = wsi.detect_tissue(context.slide, wsi.TissueSettings.model_validate(
        attrs.get("tissue", config.get("tissue", {}))))
    settings = wsi.GridSettings.model_validate(config.get("tiling", {}))
    spec = context.spec
    overlap = spec.patch_size - round(stride * spec.patch_size / spec.patch_size_level0)
    fine = dataclasses.replace(spec, step_level0=stride, overlap=max(overlap, 0))
    return wsi.build_grid(tissue, fine, settings).coords


def _embed_new(context: SlideContext, backbone: Backbone, coords: np.ndarray,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (M', D) float32 of new positions, batch by batch, and which of ``coords`` they
    belong to (those passing pixel QC when the grid used it)."""
    qc = wsi.PatchQCSettings.model_validate(context.store.attrs.get("config", {}).get("qc", {}))
    embedder = Embedder(backbone)
    stored_dtype = context.store.dtype
    parts, kept = [], []
    with wsi.PatchReader(context.slide, context.spec) as reader:
        for start in range(0, len(coords), batch_size):
            batch = reader.read_batch(coords[start:start + batch_size])
            keep = (wsi.qc_keep(wsi.measure_patches(batch), qc) if qc.enabled
                    else np.ones(len(batch), dtype=bool))
            if keep.any():
                features = embedder(context.model_pixels(batch[keep]))
                parts.append(features.astype(stored_dtype).astype(np.float32))
            kept.append(start + np.flatnonzero(keep))
    dim = context.store.feature_dim
    return (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32),
            np.concatenate(kept) if kept else np.zeros(0, np.int64))


def _scaled_attention(models: ModelEnsemble, bag: np.ndarray, originals: int,
                      class_index: int) -> np.ndarray:
    """Mean over models of each model's class attention on ``bag``, divided by its sum over the
    first ``originals`` instances (the stored attention's scale)."""
    _, per_model = models.predict(torch.from_numpy(bag))
    scaled = []
    for attention in per_model:
        values = attention_for_class(attention, class_index).astype(np.float64)
        scaled.append(values / max(values[:originals].sum(), np.finfo(np.float64).tiny))
    return np.mean(scaled, axis=0).astype(np.float32)


def save_refined(store_path: Path, model_hash: str, refined: RefinedHeatmap,
                 attributes: dict[str, Any]) -> None:
    """Write ``refined_<model hash>`` (``coords``, ``scores``, attributes) into a store as one
    atomic folder swap: readers see the old pair or the new one, never a mix."""
    rows = max(len(refined.coords), 1)
    with atomic_directory(Path(store_path) / refined_name(model_hash)) as folder:
        group = zarr.open_group(folder, mode="w", zarr_format=3)
        group.create_array("coords", data=refined.coords.astype(np.int64).reshape(-1, 2),
                           chunks=(rows, 2))
        group.create_array("scores", data=refined.scores.astype(np.float32), chunks=(rows,))
        group.attrs.update({"schema": SCHEMA, "footprint": refined.footprint, **attributes})


def load_refined(store_path: Path, model_hash: str
                 ) -> tuple[RefinedHeatmap, dict[str, Any]] | None:
    """The refined scores saved for a model (ensemble) hash, with their attributes; None when
    the store has none."""
    path = Path(store_path) / refined_name(model_hash)
    if not path.is_dir():
        return None
    group = zarr.open_group(path, mode="r", zarr_format=3)
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise ExplanationError(f"{path} is not a slidepipe refinement (schema "
                               f"{attrs.get('schema')!r}); delete it and refine again")
    coords = np.asarray(group["coords"][:], dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(group["scores"][:], dtype=np.float32)
    return RefinedHeatmap(coords, scores, int(attrs["footprint"])), attrs


def refine_context(context: SlideContext, models: ModelEnsemble, *, top_k: int | None = 8,
                   above: float | None = None, neighbourhood: int = 1, overlap: float = 0.5,
                   class_name: str | None = None, batch_size: int | None = None,
                   backbones: dict[str, Backbone] | None = None) -> RefinedHeatmap:
    """:func:`refine_slide` on an already opened slide context."""
    if not 0.0 < overlap < 1.0:
        raise ValueError(f"overlap must be in (0, 1), a fraction of the patch; got {overlap}")
    models.check_store(context.store)
    spec, store = context.spec, context.store
    stride = max(1, round(spec.patch_size_level0 * (1.0 - overlap)))
    if stride >= spec.step_level0:
        raise ValueError(f"overlap {overlap} gives a stride of {stride} px, not finer than the "
                         f"grid's {spec.step_level0} px; choose a larger overlap")
    backbone = load_store_backbone(store, models.device, backbones)
    bag = store.features()
    ranked = slide_attention(context, models, bag, class_name)
    width, height = context.slide.dimensions
    boxes = select_regions(store.coords, ranked.attention, footprint=spec.patch_size_level0,
                           step=spec.step_level0, level0_size=(width, height), top_k=top_k,
                           above=above, neighbourhood=neighbourhood)
    candidates = fine_positions(boxes, stride=stride, footprint=spec.patch_size_level0)
    candidates = candidates[np.isin(_keys(candidates, width),
                                    _keys(_tissue_positions(context, stride), width))]
    stored_keys = _keys(store.coords, width)
    order = np.argsort(stored_keys, kind="stable")
    found = np.isin(_keys(candidates, width), stored_keys)
    existing = candidates[found]
    existing_rows = order[np.searchsorted(stored_keys[order], _keys(existing, width))]
    new_coords = candidates[~found]
    step = batch_size or backbone.batch_size
    new_features, kept = _embed_new(context, backbone, new_coords, step)
    new_coords = new_coords[kept]
    scores = _scaled_attention(models, np.concatenate([bag, new_features]), len(bag),
                               ranked.class_index)
    coords = np.concatenate([existing, new_coords])
    values = np.concatenate([scores[existing_rows], scores[len(bag):]])
    row_major = np.lexsort((coords[:, 0], coords[:, 1]))
    refined = RefinedHeatmap(coords[row_major].astype(np.int64),
                             values[row_major].astype(np.float32), spec.patch_size_level0)
    save_refined(store.path, models.model_hash, refined, {
        "model_hash": models.model_hash, "models": models.hashes,
        "class": models.label_names[ranked.class_index], "class_index": ranked.class_index,
        "attention_source": ranked.source, "stride": stride, "overlap": overlap,
        "selection": {"top_k": None if above is not None else top_k, "above": above,
                      "neighbourhood": neighbourhood, "regions": boxes.tolist()},
        "new_patches": len(new_coords), "stored_patches": len(existing),
        "scale": "each model's attention on the bag of original + new instances, divided by "
                 "its sum over the original instances, averaged over models",
        "backbone": backbone.spec.name, "weights_hash": backbone.weights_hash,
        "created": datetime.now(UTC).isoformat(timespec="seconds")})
    log.info("%s: refined %d regions: %d positions (%d new) at stride %d", context.slide_id,
             len(boxes), len(coords), len(new_coords), stride)
    return refined


def refine_slide(store_path: Path, slide_path: Path, models: ModelEnsemble | Sequence[Path], *,
                 top_k: int | None = 8, above: float | None = None, neighbourhood: int = 1,
                 overlap: float = 0.5, class_name: str | None = None, device: str = "auto",
                 batch_size: int | None = None,
                 backbones: dict[str, Backbone] | None = None) -> RefinedHeatmap:
    """Refine a slide's heatmap inside its top regions (see the module docstring) and save the
    result in its store as ``refined_<model hash>``.

    Args:
        store_path: the slide's feature store (``OUT/<slide>/features_<backbone>.zarr``).
        slide_path: the slide file the store was extracted from (content hash checked).
        models: a loaded :class:`ModelEnsemble`, or checkpoints / run folders to load.
        top_k: refine around this many of the most attended patches (ignored with ``above``).
        above: instead, refine around every patch with attention >= ``above`` x the maximum.
        neighbourhood: grid steps added around each selected patch.
        overlap: overlap of neighbouring refined patches, a fraction of the footprint.
        class_name: class whose attention is used (default: the predicted class).
        device: for loading ``models`` given as paths (``auto``: CUDA when present).
        batch_size: new patches embedded at a time (default: the backbone's batch size).
        backbones: a cache of loaded backbones, shared across slides.
    """
    ensemble = (models if isinstance(models, ModelEnsemble)
                else ModelEnsemble.load(list(models), device))
    with open_slide_context(Path(store_path), Path(slide_path)) as context:
        return refine_context(context, ensemble, top_k=top_k, above=above,
                              neighbourhood=neighbourhood, overlap=overlap,
                              class_name=class_name, batch_size=batch_size, backbones=backbones)
