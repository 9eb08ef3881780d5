from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import ImageClassifier
from bench.registry import register_model


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetBody(nn.Module):
    def __init__(self, channels: int, blocks: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        c_in = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for block in range(count):
                layers.append(PreActBlock(c_in, width, stride=2 if (index > 0 and block == 0) else 1))
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


@register_model("preact-resnet18")
def preact_resnet18(info: DatasetInfo) -> ImageClassifier:
    """PreAct-ResNet18 (He et al. 2016), CIFAR stem: the field's standard backdoor-benchmark model."""
    body = PreActResNetBody(info.channels)
    return ImageClassifier(body, body.num_features, info)
