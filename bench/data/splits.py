"""The protocol's splits: a stratified clean ``reserve`` and the ``train`` rest, fixed by the seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Splits:
    reserve: torch.Tensor  # indices into the official training set, never poisoned
    train: torch.Tensor    # the rest, which the attack poisons


def make_splits(labels: torch.Tensor, seed: int, reserve_fraction: float = 0.05) -> Splits:
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(10_007 * seed + 17)
    reserve_parts = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        reserve_parts.append(members[: math.ceil(reserve_fraction * len(members))])
    reserve = torch.sort(torch.cat(reserve_parts)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[reserve] = False
    return Splits(reserve=reserve, train=torch.nonzero(keep).flatten())
