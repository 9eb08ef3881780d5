"""Every model is an ``ImageClassifier``: normalise -> body (to pooled features) -> one linear head.

Inputs are float images in [0, 1]; normalisation lives inside the model so that attacks
and defenses (trigger inversion, input-aware generators) all work in pixel space.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.data.base import DatasetInfo
from bench.errors import BenchError
from bench.registry import MODELS


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """What every model is: ``normalize`` (the dataset's mean and std, so that models take
    images in [0, 1]), ``body`` (the features, ending in one pooled vector of ``num_features``
    per image) and ``classifier`` (one linear layer). A model plugin is a function
    ``(info: DatasetInfo) -> ImageClassifier`` registered with ``@register_model("name")``;
    defenses that select units (NONE, Fine-Pruning, ANP, CLP) analyse the convolutions of
    ``body``, and ``features`` gives the penultimate features (t-SNE, NAD)."""

    def __init__(self, body: nn.Module, num_features: int, info: DatasetInfo) -> None:
        super().__init__()
        self.normalize = Normalize(info.mean, info.std)
        self.body = body
        self.classifier = nn.Linear(num_features, info.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features, e.g. for t-SNE."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(name: str, info: DatasetInfo) -> ImageClassifier:
    """Build a registered model, or any timm model as ``timm:<name>``, for the dataset's shape."""
    if name.startswith("timm:"):
        from bench.models.timm_models import build_timm

        return build_timm(name.split(":", 1)[1], info)
    builder = MODELS.get(name)
    model = builder(info)
    if not isinstance(model, ImageClassifier):
        raise BenchError(f"model {name!r} must build an ImageClassifier, got {type(model).__name__}")
    return model
