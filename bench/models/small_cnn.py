from __future__ import annotations

from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import ImageClassifier
from bench.registry import register_model


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn_body(channels: int, widths: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    c_in = channels
    for stage, width in enumerate(widths):
        if stage > 0:
            layers.append(nn.MaxPool2d(2))
        layers += conv_bn_relu(c_in, width)
        c_in = width
    layers += conv_bn_relu(c_in, c_in)
    # Global average pooling then one linear layer: channels carry the features, as in the
    # paper's models, which is what channel-based defenses assume.
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


@register_model("small-cnn")
def small_cnn(info: DatasetInfo) -> ImageClassifier:
    """4 conv-BN-ReLU layers (16-32-64-64, max-pool between stages), global average pool, linear: CPU-friendly."""
    body, features = small_cnn_body(info.channels, (16, 32, 64))
    return ImageClassifier(body, features, info)


@register_model("cnn-wide")
def cnn_wide(info: DatasetInfo) -> ImageClassifier:
    """The small CNN at twice the width (32-64-128-128): more capacity, still CPU-trainable."""
    body, features = small_cnn_body(info.channels, (32, 64, 128))
    return ImageClassifier(body, features, info)
