"""ResNet-18 in its CIFAR form (He et al. 2016; 3x3 stem, no max-pool, post-activation basic blocks),
as NONE's paper trains it, with the activation as a parameter.

NONE argues that backdoors ride on piece-wise linear activations, and its paper compares
ReLU with LeakyReLU, ELU and Softplus versions of the same network; those are registered
as ``resnet18-<activation>``; ``resnet18-w16`` is the ReLU network at a quarter of the width.
For the ImageNet form (7x7 stride-2 stem + max-pool, cheaper at 224 px) use ``timm:resnet18``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import ImageClassifier
from bench.registry import register_model

# Default slopes/betas, as the paper's variants use them. Not in-place: hooks that record a
# layer's output (NONE, fine-pruning) must see it unchanged by the activation that follows.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNetBody(nn.Module):
    def __init__(self, channels: int, activation: str = "relu", blocks: tuple[int, ...] = (2, 2, 2, 2),
                 widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        make = ACTIVATIONS[activation]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make()
        stages = []
        c_in = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for block in range(count):
                layers.append(BasicBlock(c_in, width, 2 if (index > 0 and block == 0) else 1, make))
                c_in = width
            stages.append(nn.Sequential(*layers))
        # layer1, layer2, ...: the names the paper's ResNet-18 uses, whatever the number of stages
        self.stage_names = [f"layer{index + 1}" for index in range(len(stages))]
        for name, stage in zip(self.stage_names, stages):
            setattr(self, name, stage)
        # The paper pools 4x4 at 32 px, i.e. globally; adaptive pooling keeps that at every size.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return torch.flatten(self.pool(out), 1)


def resnet18_with(activation: str, info: DatasetInfo) -> ImageClassifier:
    body = ResNetBody(info.channels, activation)
    return ImageClassifier(body, body.num_features, info)


@register_model("resnet18")
def resnet18(info: DatasetInfo) -> ImageClassifier:
    """ResNet-18, CIFAR form (3x3 stem, no max-pool), ReLU: NONE's main model."""
    return resnet18_with("relu", info)


@register_model("resnet18-w16")
def resnet18_w16(info: DatasetInfo) -> ImageClassifier:
    """ResNet-18 (CIFAR form, ReLU) at a quarter of the width (16-32-64-128): NONE's model family on a CPU.

    ``resnet18``'s blocks, BatchNorm placement, projection shortcuts and pooling head, so NONE's
    graph analysis finds the same structure, with about 1/16 of its parameters and multiply-adds.
    Unlike ``small-cnn`` it has residual adds and a BatchNorm after every convolution, as the
    paper's models (Wang et al. 2022) do."""
    body = ResNetBody(info.channels, "relu", widths=(16, 32, 64, 128))
    return ImageClassifier(body, body.num_features, info)


@register_model("resnet10-w16")
def resnet10_w16(info: DatasetInfo) -> ImageClassifier:
    """``resnet18-w16`` with one basic block per stage instead of two (16-32-64-128): the same four
    stages, projection shortcuts and BatchNorm placement at about half the convolutions."""
    body = ResNetBody(info.channels, "relu", blocks=(1, 1, 1, 1), widths=(16, 32, 64, 128))
    return ImageClassifier(body, body.num_features, info)


@register_model("resnet8-w16")
def resnet8_w16(info: DatasetInfo) -> ImageClassifier:
    """The smallest residual network here: a 3x3 stem and three stages of one basic block
    (16-32-64 channels, stride 2 between stages), as the CIFAR ResNets of He et al. (2016, section
    4.2) with n = 1, but with ``resnet18``'s projection shortcuts. Residual adds and a BatchNorm
    after every convolution, like the paper's models, at about a third of ``resnet18-w16``'s cost."""
    body = ResNetBody(info.channels, "relu", blocks=(1, 1, 1), widths=(16, 32, 64))
    return ImageClassifier(body, body.num_features, info)


@register_model("resnet18-leakyrelu")
def resnet18_leakyrelu(info: DatasetInfo) -> ImageClassifier:
    """ResNet-18 (CIFAR form) with LeakyReLU (slope 0.01): NONE's activation study."""
    return resnet18_with("leakyrelu", info)


@register_model("resnet18-elu")
def resnet18_elu(info: DatasetInfo) -> ImageClassifier:
    """ResNet-18 (CIFAR form) with ELU: NONE's activation study (not piece-wise linear)."""
    return resnet18_with("elu", info)


@register_model("resnet18-softplus")
def resnet18_softplus(info: DatasetInfo) -> ImageClassifier:
    """ResNet-18 (CIFAR form) with Softplus: NONE's activation study (smooth)."""
    return resnet18_with("softplus", info)
