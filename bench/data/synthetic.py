from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.registry import register_dataset


def make_synthetic(n_train: int, n_test: int, num_classes: int, channels: int, side: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Each class is a smooth random texture; samples are shifted, rescaled and noisy copies.

    Random shifts and contrast mean no single pixel separates the classes, yet a small
    CNN learns them in a few epochs.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    prototypes = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    prototypes = (prototypes - prototypes.mean(dim=(1, 2, 3), keepdim=True)) / prototypes.std(dim=(1, 2, 3), keepdim=True)

    def sample(n: int) -> ImageSet:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        images = prototypes[labels].clone()
        shifts = torch.randint(-2, 3, (n, 2), generator=generator)
        for dy in range(-2, 3):  # 25 groups, vectorised within each
            for dx in range(-2, 3):
                group = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                images[group] = torch.roll(images[group], shifts=(dy, dx), dims=(2, 3))
        contrast = 0.6 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
        brightness = 0.1 * torch.randn(n, 1, 1, 1, generator=generator)
        noise = 0.35 * torch.randn(images.shape, generator=generator)
        pixels = 0.5 + 0.18 * (contrast * images + noise) + brightness
        return ImageSet((pixels.clamp(0, 1) * 255).round().to(torch.uint8), labels.long())

    return sample(n_train), sample(n_test)


@register_dataset("synthetic")
class Synthetic(Dataset):
    """Generated 10-class 3x16x16 textures (4000 train / 1000 test): learnable in seconds, for tests and smoke runs."""

    info = DatasetInfo("synthetic", 10, (3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), hflip=False)

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        return make_synthetic(4000, 1000, self.info.num_classes, self.info.channels, self.info.side)
