"""Task heads: the same backbone serves as a causal language model or a sequence classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SequenceClassifier(nn.Module):
    """Classify a right-padded token sequence from the hidden state of its last real token.

    Backbones are causal, so that state has read the whole input and none of the padding.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pad_id: int = 0):
        super().__init__()
        self.backbone, self.pad_id = backbone, pad_id
        self.head = nn.Linear(backbone.d_model, num_classes)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.backbone(ids)
        last = (ids != self.pad_id).sum(1).clamp(min=1) - 1
        return h[torch.arange(ids.shape[0], device=ids.device), last]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))


class CosineHead(nn.Module):
    """Logits = scale * cos(feature, class weight): no bias, and every class weight is normalised.

    A linear head trained class-incrementally grows the weight norms and biases of the newest
    classes (their gradients are the only ones pushing up), so old classes lose the argmax even when
    the features still separate them. Here a class's logit depends on its weight's direction only,
    so that route to recency bias is closed by construction (Hou et al. 2019 use the same form).
    `scale` sets the softmax temperature (cosines lie in [-1, 1]).
    """

    def __init__(self, d: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, d) * d ** -0.5)
        self.scale = float(scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


HEADS = ("linear", "cosine")


def make_head(kind: str, d: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"model.head: '{kind}' is not one of {HEADS}")
    return nn.Linear(d, num_classes) if kind == "linear" else CosineHead(d, num_classes, scale)


class CausalLM(nn.Module):
    """Next-token prediction head, weights tied to the backbone's embedding when it has one."""

    def __init__(self, backbone: nn.Module, vocab_size: int, tie: bool = True):
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(backbone.d_model, vocab_size, bias=False)
        if tie and hasattr(backbone, "embed"):
            self.lm_head.weight = backbone.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone(ids))

    def loss(self, ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=pad_id)


class MLPClassifier(nn.Module):
    """Plain MLP for flat vision inputs (e.g. 784-pixel MNIST)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(n_layers):
            layers += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
