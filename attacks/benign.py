from __future__ import annotations

import torch

from bench.attack import Attack, Poisoned
from bench.data.base import ImageSet
from bench.registry import register_attack


@register_attack("benign")
class Benign(Attack):
    """No poisoning: a clean training set (the natural-backdoor row; ASR does not apply)."""

    has_trigger = False

    def poison(self, train: ImageSet) -> Poisoned:
        return Poisoned(ImageSet(train.x, train.y), torch.empty(0, dtype=torch.long), 0.0, 0.0)

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x
