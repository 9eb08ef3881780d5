"""VGG-16 in the CIFAR form NONE's paper trains (configuration D, no BatchNorm, the fully-connected
layers replaced by one linear classifier on the 512 channels).

At 32 px the fifth max-pool leaves 1x1x512, which the paper flattens into its linear layer.
Here the fifth pool is a global max-pool: identical at 32 px, and still a 512-feature
vector at other sizes. The first four pools round up, so odd sides (MNIST's 28 -> 14 -> 7
-> 4 -> 2) work; at even sides they are the paper's pools.
"""
from __future__ import annotations

from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import ImageClassifier
from bench.registry import register_model

VGG16_WIDTHS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


def vgg_body(channels: int, widths: tuple[int | str, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    c_in = channels
    pools = sum(1 for width in widths if width == "M")
    seen = 0
    for width in widths:
        if width == "M":
            seen += 1
            layers.append(nn.AdaptiveMaxPool2d(1) if seen == pools else nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        conv = nn.Conv2d(c_in, int(width), 3, padding=1)
        # He-normal weights, zero bias, as the paper's VGG; without BatchNorm the scale matters.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        # Not in-place: a hook on the convolution must record its pre-activation output.
        layers += [conv, nn.ReLU()]
        c_in = int(width)
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in


@register_model("vgg16")
def vgg16(info: DatasetInfo) -> ImageClassifier:
    """VGG-16, CIFAR form (13 conv-ReLU, no BatchNorm, 5 max-pools, one linear layer on 512 features)."""
    body, features = vgg_body(info.channels, VGG16_WIDTHS)
    model = ImageClassifier(body, features, info)
    nn.init.normal_(model.classifier.weight, 0.0, 0.01)
    nn.init.zeros_(model.classifier.bias)
    return model
