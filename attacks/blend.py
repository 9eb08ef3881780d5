from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.attack import Attack, AttackConfig
from bench.config import require
from bench.registry import register_attack


@dataclass
class BlendConfig(AttackConfig):
    alpha: float = 0.2  # weight of the key pattern in the blend, for training and test images

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, alpha="(0, 1]")


@register_attack("blend")
class Blend(Attack):
    """Blended injection (Chen et al. 2017): x' = (1 - alpha) x + alpha k with a fixed key pattern k.

    The key is the paper's random-pattern key: an image whose every pixel is uniform in
    [0, 1] (the Hello-Kitty variant would need a downloaded image). It is drawn once, at
    the dataset's full shape, from the cell's seed, so it is fixed within a stage and
    reproducible. Training and test images use the same alpha.
    """

    Config = BlendConfig

    def __init__(self, config: BlendConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        self.pattern = torch.rand(info.shape, generator=self.generator("pattern"))

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = self.config.alpha
        return (1 - alpha) * x + alpha * self.pattern.to(x.device, x.dtype)
