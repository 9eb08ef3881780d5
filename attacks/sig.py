from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench import progress
from bench.attack import Attack, AttackConfig, Poisoned, to_uint8
from bench.config import require
from bench.data.base import ImageSet, to_unit
from bench.registry import register_attack


@dataclass
class SIGConfig(AttackConfig):
    delta: float = 20 / 255         # amplitude of the sinusoid on training images (pixel scale [0, 1])
    test_delta: float | None = None  # amplitude at test time; None = delta (the same signal)
    frequency: float = 6.0           # periods across the image width

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, delta="(0, 1]", test_delta="(0, 1]", frequency="> 0")
        if self.target_mode == "all-to-all":
            # Checked in the config so a grid with this setting fails before any training.
            raise ValueError("sig is clean-label: it cannot be all-to-all (a sample would need "
                             "its own label and the next class at once)")


@register_attack("sig")
class SIG(Attack):
    """SIG (Barni et al. 2019): a clean-label attack with a horizontal sinusoidal signal.

    v(i, j) = delta * sin(2 pi j f / W) is added to every row (all channels) and the result
    clipped to [0, 1]. Only training images of the target class are poisoned and their
    labels are never changed: the model learns to associate the signal with the target
    class, and the same signal on any test image then triggers it.

    ``poison_rate`` is a fraction of the whole training set, as for every attack; when the
    target class holds fewer samples, all of it is poisoned and the rate actually reached
    is what the stage reports (``poison_rate`` in its metrics; a log line says so).
    Slow poisoning is supported; all-to-all is not (clean-label), and asking for it is an error.
    """

    Config = SIGConfig
    clean_label = True

    def __init__(self, config: SIGConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        columns = torch.arange(info.side, dtype=torch.float32)
        self.wave = torch.sin(2 * math.pi * columns * config.frequency / info.side)  # (W,)

    def signal(self, delta: float, device: torch.device) -> torch.Tensor:
        return (delta * self.wave).to(device).view(1, 1, 1, -1)

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + self.signal(self.config.delta, x.device)).clamp(0, 1)

    def poison(self, train: ImageSet) -> Poisoned:
        poisoned = super().poison(train)
        if len(poisoned.poisoned_indices) < round(self.config.poison_rate * len(train)):
            progress.log(f"sig: the target class {self.config.target} has only {len(poisoned.poisoned_indices)} "
                         f"training samples; poison rate reached {100 * poisoned.achieved_rate:.2f}% "
                         f"instead of {100 * self.config.poison_rate:.2f}%")
        return poisoned

    @torch.no_grad()
    def triggered_test_set(self, test: ImageSet):
        keep = torch.nonzero(self.evaluation_mask(test.y)).flatten()
        x, y = test.x[keep], test.y[keep]
        delta = self.config.delta if self.config.test_delta is None else self.config.test_delta
        out = torch.empty_like(x)
        for start in range(0, len(x), 1024):
            sl = slice(start, start + 1024)
            out[sl] = to_uint8(to_unit(x[sl]) + self.signal(delta, x.device))
        return out, y, self.target_labels(y)
