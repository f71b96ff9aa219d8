"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021).

Instances are embedded (``Linear -> ReLU -> Dropout``) and scored by gated attention.

* **CLAM-SB** has one attention branch; the attention-pooled embedding feeds one linear bag
  classifier. Attention is ``(B, N)``.
* **CLAM-MB** has one attention branch per class; class ``c``'s pooled embedding feeds class
  ``c``'s own one-logit bag classifier. Attention is ``(B, C, N)``.

**Instance-level clustering** (training mode, labels given). Each class ``c`` has a binary
instance classifier on the instance embeddings. For a bag of true class ``y``, ranked by the
attention of the branch of ``y`` (the single branch for SB):

* in-class: the ``k`` most attended instances are pseudo-labelled positive (1) and the ``k``
  least attended negative (0) for classifier ``y``;
* out-of-class (``out_of_class=True``, the paper's setting for mutually exclusive classes): for
  every other class ``j``, the ``k`` instances most attended by branch ``j`` (SB: the single
  branch) are pseudo-labelled negative for classifier ``j``.

``k`` (8 by default) is clipped to the bag: the in-class positive and negative sets take
``min(k, max(n // 2, 1))`` instances each (disjoint, so no instance gets both pseudo-labels; a
one-instance bag gets only a positive), the out-of-class set ``min(k, n)``. The loss is the
smooth top-1 SVM loss of Berrada et al. (2018) (``instance_loss="svm"``, temperature 1,
margin 1, as in the paper) or cross-entropy (``"ce"``), averaged over the pseudo-labelled
instances of each classifier, summed over the classifiers used and divided by the number of
classes, then averaged over the bags. The total loss is
``bag_weight * bag cross-entropy + (1 - bag_weight) * instance loss`` (``bag_weight`` 0.7).

Both variants are permutation invariant (attention softmax over valid instances only).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from .base import MILModel, MILOutput, bag_cross_entropy, masked_softmax, prepare_bags
from .layers import AttentionScorer, instance_embedding

__all__ = ["CLAMMB", "CLAMSB", "smooth_top1_svm_loss"]


def smooth_top1_svm_loss(scores: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, margin: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada, Zisserman & Kumar, ICLR 2018), averaged.

    ``L(s, y) = τ · log Σ_j exp((s_j + α·[j ≠ y]) / τ) − s_y``: a smooth upper bound of the
    hinge ``max_j (s_j + α·[j ≠ y]) − s_y`` that tends to it as ``τ → 0``.
    """
    one_hot = F.one_hot(targets, scores.shape[-1]).to(scores.dtype)
    augmented = (scores + margin * (1.0 - one_hot)) / temperature
    true_scores = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (temperature * torch.logsumexp(augmented, dim=-1) - true_scores).mean()


class _CLAM(MILModel):
    """Shared machinery of CLAM-SB and CLAM-MB; ``n_branches`` is 1 or ``n_classes``."""

    def __init__(self, in_dim: int, n_classes: int, n_branches: int, *, embed_dim: int,
                 attention_dim: int, dropout: float, k_sample: int, bag_weight: float,
                 instance_loss: str, out_of_class: bool) -> None:
        super().__init__(in_dim, n_classes)
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1; got {k_sample}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must lie in [0, 1]; got {bag_weight}")
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"instance_loss must be 'svm' or 'ce'; got {instance_loss!r}")
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.instance_loss = instance_loss
        self.out_of_class = out_of_class
        self.embedding = instance_embedding(in_dim, embed_dim, dropout)
        self.attention = AttentionScorer(embed_dim, attention_dim, n_branches=n_branches,
                                         gated=True, dropout=dropout)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(embed_dim, 2) for _ in range(n_classes))

    @abstractmethod
    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` from pooled embeddings ``(B, n_branches, H)``."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None) -> MILOutput:
        """Logits, attention and, in training mode with ``labels``, the instance loss.

        ``extra`` then holds ``instance_loss`` (scalar), ``instance_logits`` ``(M, 2)`` and
        ``instance_targets`` ``(M,)`` of every pseudo-labelled instance (for monitoring).
        """
        features, mask = prepare_bags(features, mask)
        embeddings = self.embedding(features)                      # (B, N, H)
        scores = self.attention(embeddings)                        # (B, K, N)
        attention = masked_softmax(scores, mask.unsqueeze(1))      # (B, K, N)
        pooled = torch.bmm(attention.to(embeddings.dtype), embeddings)   # (B, K, H)
        logits = self._bag_logits(pooled)
        extra: dict[str, torch.Tensor] = {}
        if self.training and labels is not None:
            labels = self._check_labels(labels, features.shape[0])
            extra = self._instance_clustering(embeddings, scores, mask, labels)
        out_attention = attention[:, 0] if attention.shape[1] == 1 else attention
        return MILOutput(logits=logits, attention=out_attention, extra=extra)

    def _instance_clustering(self, embeddings: torch.Tensor, scores: torch.Tensor,
                             mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pseudo-label top/bottom-k instances per bag and score them (see module docstring)."""
        bag_losses, all_logits, all_targets = [], [], []
        for bag in range(embeddings.shape[0]):
            valid = mask[bag].nonzero().squeeze(1)
            bag_embeddings = embeddings[bag, valid]                # (n, H)
            bag_scores = scores[bag][:, valid].detach()            # (K, n)
            n = valid.numel()
            true_class = int(labels[bag])
            loss = embeddings.new_zeros((), dtype=torch.float32)
            for cls in range(self.n_classes):
                if cls != true_class and not self.out_of_class:
                    continue
                ranking = bag_scores[cls if bag_scores.shape[0] > 1 else 0]
                if cls == true_class:
                    k = min(self.k_sample, max(n // 2, 1))
                    k_neg = min(k, n - k)
                    order = torch.argsort(ranking, descending=True)
                    chosen = torch.cat([order[:k], order[n - k_neg:]])
                    targets = torch.cat([torch.ones(k, dtype=torch.long),
                                         torch.zeros(k_neg, dtype=torch.long)])
                else:
                    k = min(self.k_sample, n)
                    chosen = torch.topk(ranking, k).indices
                    targets = torch.zeros(k, dtype=torch.long)
                targets = targets.to(embeddings.device)
                instance_logits = self.instance_classifiers[cls](bag_embeddings[chosen]).float()
                loss = loss + self._pseudo_label_loss(instance_logits, targets)
                all_logits.append(instance_logits)
                all_targets.append(targets)
            bag_losses.append(loss / self.n_classes)
        return {"instance_loss": torch.stack(bag_losses).mean(),
                "instance_logits": torch.cat(all_logits),
                "instance_targets": torch.cat(all_targets)}

    def _pseudo_label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.instance_loss == "svm":
            return smooth_top1_svm_loss(logits, targets)
        return F.cross_entropy(logits, targets)

    def compute_loss(self, output: MILOutput, labels: torch.Tensor,
                     class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``bag_weight * CE + (1 - bag_weight) * instance loss``; plain CE without the latter."""
        bag_loss = bag_cross_entropy(output.logits, labels, class_weights)
        instance_loss = output.extra.get("instance_loss")
        if instance_loss is None:
            return bag_loss
        return self.bag_weight * bag_loss + (1.0 - self.bag_weight) * instance_loss


class CLAMSB(_CLAM):
    """CLAM single-branch: one gated attention branch and one linear bag classifier.

    Args:
        in_dim: instance feature size. n_classes: number of classes.
        embed_dim: instance embedding size (512 in the paper's "small" model).
        attention_dim: gated-attention hidden size (256 in the paper).
        dropout: dropout after the embedding and in the attention network.
        k_sample: instances per pseudo-label set in the clustering loss.
        bag_weight: weight of the bag loss against the instance loss.
        instance_loss: ``"svm"`` (smooth top-1 SVM) or ``"ce"``.
        out_of_class: also use out-of-class negatives (mutually exclusive classes).
    """

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 512,
                 attention_dim: int = 256, dropout: float = 0.25, k_sample: int = 8,
                 bag_weight: float = 0.7, instance_loss: str = "svm",
                 out_of_class: bool = True) -> None:
        super().__init__(in_dim, n_classes, 1, embed_dim=embed_dim,
                         attention_dim=attention_dim, dropout=dropout, k_sample=k_sample,
                         bag_weight=bag_weight, instance_loss=instance_loss,
                         out_of_class=out_of_class)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled[:, 0])


class CLAMMB(_CLAM):
    """CLAM multi-branch: one attention branch and one one-logit bag classifier per class.

    Takes the same arguments as :class:`CLAMSB`. Attention is per class, ``(B, C, N)``.
    """

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 512,
                 attention_dim: int = 256, dropout: float = 0.25, k_sample: int = 8,
                 bag_weight: float = 0.7, instance_loss: str = "svm",
                 out_of_class: bool = True) -> None:
        super().__init__(in_dim, n_classes, n_classes, embed_dim=embed_dim,
                         attention_dim=attention_dim, dropout=dropout, k_sample=k_sample,
                         bag_weight=bag_weight, instance_loss=instance_loss,
                         out_of_class=out_of_class)
        bound = embed_dim ** -0.5
        # C independent Linear(embed_dim, 1) classifiers, stored as one (C, H) weight.
        self.classifier_weight = nn.Parameter(torch.empty(n_classes, embed_dim).uniform_(
            -bound, bound))
        self.classifier_bias = nn.Parameter(torch.empty(n_classes).uniform_(-bound, bound))

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled * self.classifier_weight).sum(-1) + self.classifier_bias
