"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain and gated.

Each instance ``x_k`` is embedded as ``h_k = Dropout(ReLU(W x_k + b))``; the bag embedding is
the attention-weighted sum ``z = Σ_k a_k h_k`` with

* plain attention: ``a_k = softmax_k(wᵀ tanh(V h_k))``,
* gated attention: ``a_k = softmax_k(wᵀ (tanh(V h_k) ⊙ sigm(U h_k)))``,

and a linear classifier maps ``z`` to the class logits. The softmax runs only over a bag's
valid instances (padding gets exactly zero weight), so the model is permutation invariant:
permuting the instances permutes the attention identically and leaves the logits unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, MILOutput, masked_softmax, prepare_bags
from .layers import AttentionScorer, instance_embedding

__all__ = ["ABMIL", "GatedABMIL"]


class ABMIL(MILModel):
    """Attention MIL pooling with a single attention branch.

    Args:
        in_dim: instance feature size ``D``.
        n_classes: number of bag classes ``C``.
        embed_dim: size of the instance embedding ``h_k`` (256 or 512 are usual).
        attention_dim: size of the attention hidden layer (``V``, ``U``).
        dropout: dropout after the instance embedding and inside the attention network.
        gated: use the gated attention mechanism.
    """

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 256,
                 attention_dim: int = 128, dropout: float = 0.25, gated: bool = False) -> None:
        super().__init__(in_dim, n_classes)
        self.embedding = instance_embedding(in_dim, embed_dim, dropout)
        self.attention = AttentionScorer(embed_dim, attention_dim, gated=gated, dropout=dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None) -> MILOutput:
        """Logits ``(B, C)`` and attention ``(B, N)``; ``labels`` is not used."""
        features, mask = prepare_bags(features, mask)
        embeddings = self.embedding(features)                      # (B, N, H)
        scores = self.attention(embeddings)[:, 0]                  # (B, N)
        attention = masked_softmax(scores, mask)                   # (B, N), float32
        pooled = torch.bmm(attention.unsqueeze(1).to(embeddings.dtype), embeddings)[:, 0]
        return MILOutput(logits=self.classifier(pooled), attention=attention)


class GatedABMIL(ABMIL):
    """:class:`ABMIL` with the gated attention mechanism (``gated=True``)."""

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 256,
                 attention_dim: int = 128, dropout: float = 0.25, gated: bool = True) -> None:
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, attention_dim=attention_dim,
                         dropout=dropout, gated=gated)
