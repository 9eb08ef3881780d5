from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.attack import Attack, AttackConfig
from bench.config import require
from bench.registry import register_attack


def scaled_trigger_side(image_side: int, side_at_32: int = 3) -> int:
    """Trigger sizes are given for 32x32 images and scale with the image side."""
    return max(1, round(side_at_32 * image_side / 32))


@dataclass
class BadNetsConfig(AttackConfig):
    size: int | None = None  # trigger side in pixels; None = 3 px at 32x32, scaled with the image
    value: float = 1.0       # pixel value of the square (1.0 = white)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, size=">= 1", value="[0, 1]")


@register_attack("badnets")
class BadNets(Attack):
    """BadNets (Gu et al. 2017): a white square at the bottom-right corner, 3x3 at 32 px."""

    Config = BadNetsConfig

    def __init__(self, config: BadNetsConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        self.side = config.size or scaled_trigger_side(info.side)

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, -self.side:, -self.side:] = self.config.value
        return x
