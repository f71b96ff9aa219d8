"""MIL models behind one interface (:class:`MILModel`), one model per module, and a registry.

Example::

    model = build_model("gated_abmil", in_dim=1024, n_classes=2, embed_dim=512)
    output = model(features, mask)              # MILOutput(logits, attention, extra)
    loss = model.compute_loss(output, labels)
    probabilities, attention = model.predict(features, mask)

Adding a model means adding a module and one registry entry; no other model changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .abmil import ABMIL, GatedABMIL
from .base import MILModel, MILOutput, masked_softmax, prepare_bags
from .clam import CLAMMB, CLAMSB
from .pooling import MaxPoolMIL, MeanPoolMIL
from .transmil import TransMIL

__all__ = [
    "ABMIL",
    "CLAMMB",
    "CLAMSB",
    "MODELS",
    "GatedABMIL",
    "MILModel",
    "MILOutput",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "TransMIL",
    "build_model",
    "masked_softmax",
    "model_names",
    "prepare_bags",
]

#: Registry: model name -> constructor ``(in_dim, n_classes, **options) -> MILModel``.
MODELS: dict[str, Callable[..., MILModel]] = {
    "abmil": ABMIL,
    "gated_abmil": GatedABMIL,
    "clam_sb": CLAMSB,
    "clam_mb": CLAMMB,
    "transmil": TransMIL,
    "mean_pool": MeanPoolMIL,
    "max_pool": MaxPoolMIL,
}


def model_names() -> list[str]:
    """Names accepted by :func:`build_model`, in registry order."""
    return list(MODELS)


def build_model(name: str, in_dim: int, n_classes: int, **options: Any) -> MILModel:
    """Construct the model registered as ``name``.

    Args:
        name: a registry name (see :func:`model_names`).
        in_dim: instance feature size ``D``.
        n_classes: number of bag classes ``C``.
        **options: model-specific keyword options (e.g. ``embed_dim``, ``dropout``).

    Raises:
        ValueError: for an unknown name or an option the model does not take.
    """
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; choose one of: "
                         f"{', '.join(model_names())}") from None
    try:
        return constructor(in_dim, n_classes, **options)
    except TypeError as error:
        raise ValueError(f"bad options for MIL model {name!r}: {error}") from error
