"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with a transformer over the instances.

Per bag: instances are projected (``Linear -> ReLU``), a learnt class token is prepended, and
two transformer layers ``x + NyströmAttention(LayerNorm(x))`` mix the tokens, with the PPEG
positional encoding between them; the class token, layer-normalised, feeds a linear classifier.

**PPEG** (pyramid position encoding generator): the instance tokens are laid out row-major on
the smallest square grid that holds them (``side = ceil(√n)``), and
``grid + DWConv7(grid) + DWConv5(grid) + DWConv3(grid)`` (depth-wise, "same" padding) is read
back in the same order; the class token passes unchanged.

**Padding and batches.** Each bag is processed on its own valid instances only (a Python loop
over the batch), so a padded batch gives the same outputs as the bags one by one. Unlike the
reference formulation, which squares the sequence by repeating its first instances, the grid
cells beyond the ``n`` instances are zeros that exist only inside PPEG (they play the role of
the convolutions' zero padding and are never attended to). Likewise the class token is kept
out of the Nyström layer's value convolution (a sequence operation): otherwise it would read
the first instances of the sequence directly, bypassing attention, which on small bags
measurably hurt both accuracy and localisation.

**Order dependence.** TransMIL is *not* permutation invariant, by design: PPEG convolves grid
neighbours, the value-convolution skip of the Nyström layer convolves sequence neighbours, and
Nyström landmarks are means of contiguous segments. Permuting instances therefore changes the
logits. slidepipe feeds a slide's instances in the tiling grid's row-major order (the feature
store's order), so that sequence neighbours are mostly spatial neighbours. With
``positional_encoding=False``, ``residual_kernel=0`` and bags of at most ``n_landmarks``
instances (exact attention) the model is exactly permutation invariant.

**Attention for heatmaps** (``attention_map``), computed through the Nyström factors for long
bags (never an ``n × n`` matrix), averaged over heads, clipped at zero, restricted to the valid
instances and normalised to sum to one:

* ``"rollout"`` (default): attention rollout (Abnar & Zuidema, ACL 2020) over both layers,
  the class-token row of ``(½I + ½A₂)(½I + ½A₁)``, with PPEG and the value convolution taken
  as identity. The last layer alone is an unreliable localiser: the first layer can already
  gather the evidence into every token, after which the class token may read it from
  anywhere. On the synthetic witness task of the tests (eight training runs: four seeds,
  exact and Nyström attention) the most attended instance was a key instance in 30-100 % of
  positive bags with ``"last_layer"`` and in 94-100 % with ``"rollout"``.
* ``"last_layer"``: the class token's attention row in the last layer (the reference choice).

Memory is O(n·m) for ``m`` landmarks (no ``n × n`` matrix), so bags of 100 000 instances fit;
rollout keeps the first layer's factors until the end of the bag (``2·h·n·m`` floats: about
1.6 GB for 100 000 instances with the default 8 heads and 256 landmarks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MILModel, MILOutput, prepare_bags
from .nystrom import AttentionMap, NystromAttention

__all__ = ["PPEG", "TransMIL"]


class PPEG(nn.Module):
    """Pyramid position encoding generator: sum of depth-wise 7/5/3 convolutions on a grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim) for size in (7, 5, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode ``(1 + n, dim)`` tokens (class token first) and return the same shape."""
        class_token, instances = tokens[:1], tokens[1:]
        n, dim = instances.shape
        side = math.isqrt(n - 1) + 1                 # ceil(sqrt(n)) for n >= 1
        grid = torch.cat([instances, instances.new_zeros(side * side - n, dim)])
        grid = grid.view(side, side, dim).permute(2, 0, 1).unsqueeze(0)   # (1, dim, side, side)
        encoded = grid + sum(conv(grid) for conv in self.convs)
        instances = encoded[0].permute(1, 2, 0).reshape(side * side, dim)[:n]
        return torch.cat([class_token, instances])


class _TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + Attention(LayerNorm(x))``."""

    def __init__(self, dim: int, attention: NystromAttention) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, AttentionMap]:
        attended, attention_map = self.attention(self.norm(tokens))
        return tokens + attended, attention_map


class TransMIL(MILModel):
    """TransMIL with Nyström attention and PPEG.

    Args:
        in_dim: instance feature size. n_classes: number of classes.
        embed_dim: token size (512 in the paper); divisible by ``n_heads``.
        n_heads: attention heads (8).
        n_landmarks: Nyström landmarks (``embed_dim // 2`` = 256 in the paper).
        pinv_iterations: pseudo-inverse iterations (6).
        residual_kernel: value-convolution kernel of the Nyström skip path (33; 0 disables).
        dropout: dropout after the projection and on the attention outputs.
        positional_encoding: apply PPEG between the two layers.
        attention_map: ``"rollout"`` or ``"last_layer"`` (see the module docstring).
    """

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 512, n_heads: int = 8,
                 n_landmarks: int = 256, pinv_iterations: int = 6, residual_kernel: int = 33,
                 dropout: float = 0.1, positional_encoding: bool = True,
                 attention_map: str = "rollout") -> None:
        super().__init__(in_dim, n_classes)
        if attention_map not in ("rollout", "last_layer"):
            raise ValueError("attention_map must be 'rollout' or 'last_layer'; got "
                             f"{attention_map!r}")
        self.attention_map = attention_map
        self.projection = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(),
                                        nn.Dropout(dropout))
        self.class_token = nn.Parameter(torch.randn(1, embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            _TransLayer(embed_dim, NystromAttention(
                embed_dim, n_heads=n_heads, n_landmarks=n_landmarks,
                pinv_iterations=pinv_iterations, residual_kernel=residual_kernel,
                dropout=dropout, global_tokens=1))
            for _ in range(2))
        self.ppeg = PPEG(embed_dim) if positional_encoding else None
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None) -> MILOutput:
        """Logits ``(B, C)`` and (detached) class-token attention ``(B, N)``; no ``labels``."""
        features, mask = prepare_bags(features, mask)
        batch, length, _ = features.shape
        logits, attention = [], features.new_zeros(batch, length, dtype=torch.float32)
        for bag in range(batch):
            valid = mask[bag].nonzero().squeeze(1)
            bag_logits, bag_attention = self._forward_bag(features[bag, valid])
            logits.append(bag_logits)
            attention[bag, valid] = bag_attention.float()
        return MILOutput(logits=torch.stack(logits), attention=attention)

    def _forward_bag(self, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(C,)`` and normalised instance attention ``(n,)`` of one bag ``(n, D)``."""
        tokens = torch.cat([self.class_token.to(instances.dtype), self.projection(instances)])
        tokens, first_map = self.layers[0](tokens)
        if self.attention_map != "rollout":
            del first_map                                  # free the factors early
        if self.ppeg is not None:
            tokens = self.ppeg(tokens)
        tokens, last_map = self.layers[1](tokens)
        logits = self.classifier(self.norm(tokens[0]))
        row = last_map.row(0)
        if self.attention_map == "rollout":
            row = 0.5 * row
            row[0] += 0.5                                  # class-token row of ½I + ½A₂
            row = 0.5 * row + 0.5 * first_map.left_multiply(row)
        weights = row[1:].clamp_min(0.0)
        total = weights.sum()
        uniform = torch.full_like(weights, 1.0 / weights.numel())
        return logits, torch.where(total > 0, weights / total.clamp_min(1e-30), uniform)
