from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.attack import Attack, AttackConfig, Poisoned
from bench.config import require
from bench.data.base import ImageSet
from bench.registry import register_attack


@dataclass
class WaNetConfig(AttackConfig):
    k: int = 4                  # control grid side of the random warping field
    s: float = 0.5              # warping strength
    grid_rescale: float = 1.0   # scale of the warped grid (1: no rescale)
    cross_ratio: float = 2.0    # noise-mode samples per poisoned sample (0 disables noise mode)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, k=">= 2", s="> 0", grid_rescale="> 0", cross_ratio=">= 0")


@register_attack("wanet")
class WaNet(Attack):
    """WaNet (Nguyen & Tran 2021): an imperceptible warping trigger applied with grid_sample.

    The warping field is a k x k grid of random offsets in [-1, 1], normalised to mean
    absolute value 1 and upsampled bicubically to the image size; the trigger moves each
    pixel by s * field / H (in grid_sample's [-1, 1] coordinates), scaled by grid_rescale
    and clipped to the image. The field is drawn once from the cell's seed.

    Dynamic poisoning, as in the paper: the returned training set keeps clean images and
    its ``transform`` warps each batch after augmentation. The samples it warps are a
    fixed, recorded set (``poisoned_indices``, relabelled to the target), so detection
    metrics have ground truth; the paper picks them afresh in each batch. Noise mode: a
    further fixed set of ``cross_ratio`` x as many samples (never poisoned ones) is warped
    with the backdoor field plus fresh random per-pixel noise of up to one pixel each time
    it is drawn, and keeps its label, so the model learns that only the exact field is the
    trigger. Noise-mode samples are not in ``poisoned_indices`` (they carry no backdoor).
    All-to-all and slow poisoning are supported (the schedule ramps the poisoned indices).
    """

    Config = WaNetConfig

    def __init__(self, config: WaNetConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        side = info.side
        offsets = torch.rand(1, 2, config.k, config.k, generator=self.generator("field")) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ramp = torch.linspace(-1, 1, side)
        rows, cols = torch.meshgrid(ramp, ramp, indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample wants (x, y) order
        self.grid = ((identity + config.s * field / side) * config.grid_rescale).clamp(-1, 1)  # (1, H, W, 2)

    def _grid_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Kept on the compute device: a host copy in every batch would stall the GPU.
        if self.grid.device != device or self.grid.dtype != dtype:
            self.grid = self.grid.to(device, dtype)
        return self.grid

    def warp(self, x: torch.Tensor, noise: bool = False) -> torch.Tensor:
        grid = self._grid_on(x.device, x.dtype).expand(len(x), -1, -1, -1)
        if noise:
            jitter = torch.rand(grid.shape, device=x.device, dtype=x.dtype) * 2 - 1
            grid = (grid + jitter / self.info.side).clamp(-1, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.warp(x)

    def choose_noise_indices(self, y: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
        count = round(self.config.cross_ratio * len(poisoned))
        eligible = torch.ones(len(y), dtype=torch.bool)
        eligible[poisoned] = False
        candidates = torch.nonzero(eligible).flatten()
        chosen = candidates[torch.randperm(len(candidates), generator=self.generator("noise"))[:count]]
        return torch.sort(chosen).values

    def poison(self, train: ImageSet) -> Poisoned:
        indices = self.choose_poison_indices(train.y)
        noise_indices = self.choose_noise_indices(train.y, indices)
        device = train.x.device
        # Role of each training sample: 0 clean, 1 backdoor, 2 noise mode (a lookup, so no host sync per batch).
        role = torch.zeros(len(train), dtype=torch.uint8)
        role[indices] = 1
        role[noise_indices] = 2
        role = role.to(device)
        y = train.y.clone()
        on_device = indices.to(device)
        y[on_device] = self.target_labels(y[on_device])

        def transform(x: torch.Tensor, labels: torch.Tensor, batch_indices: torch.Tensor):
            batch_role = role[batch_indices].view(-1, 1, 1, 1)
            x = torch.where(batch_role == 1, self.warp(x), x)
            if noise_indices.numel():
                x = torch.where(batch_role == 2, self.warp(x, noise=True), x)
            return x, labels

        schedule = self.slow_schedule(len(y), indices) if self.config.schedule == "slow" else None
        return Poisoned(ImageSet(train.x, y, transform=transform, schedule=schedule), indices,
                        self.config.poison_rate, len(indices) / max(len(y), 1))
