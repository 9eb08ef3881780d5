"""Network in Network (Lin et al. 2014), the CIFAR model of NONE's natural-backdoor experiments.

Three mlpconv blocks (a spatial convolution followed by two 1x1 convolutions), max-pool
and average-pool between them with dropout. The original ends with a 1x1 convolution to
the class count, a ReLU, and an 8x8 (at 32 px: global) average pool. Average pooling and a
1x1 convolution commute, so here the 192 globally pooled channels feed one linear layer:
the original's function minus the ReLU on the per-position class scores before averaging.
That keeps the ``ImageClassifier`` form (pooled features, one linear head) and the same
convolutions for NONE to analyse, with the same parameter count.
"""
from __future__ import annotations

from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import ImageClassifier
from bench.registry import register_model


def _conv(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    # Not in-place: a hook on the convolution must record its pre-activation output.
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.ReLU()]


def nin_body(channels: int) -> tuple[nn.Module, int]:
    layers = [
        *_conv(channels, 192, 5), *_conv(192, 160, 1), *_conv(160, 96, 1),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Dropout(0.5),
        *_conv(96, 192, 5), *_conv(192, 192, 1), *_conv(192, 192, 1),
        nn.AvgPool2d(3, stride=2, padding=1), nn.Dropout(0.5),
        *_conv(192, 192, 3), *_conv(192, 192, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ]
    return nn.Sequential(*layers), 192


def _init(module: nn.Module) -> None:
    # The paper's initialisation: small Gaussians (std 0.05, bias std 0.001) everywhere.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.05)
        nn.init.normal_(module.bias, 0.0, 0.001)


@register_model("nin")
def nin(info: DatasetInfo) -> ImageClassifier:
    """Network in Network (3 mlpconv blocks, dropout, global average pool, linear): NONE's natural-backdoor model."""
    body, features = nin_body(info.channels)
    model = ImageClassifier(body, features, info)
    model.apply(_init)
    return model
