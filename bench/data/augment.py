"""Batched, vectorised augmentation on the device (no per-sample PIL work)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset, independently per sample."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    # The generator lives on the images' device: no host round-trip per batch.
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gathers (N, H, W, C); move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, *, padding: int, hflip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    x = random_crop(x, padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return x
