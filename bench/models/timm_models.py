from __future__ import annotations

from bench.data.base import DatasetInfo
from bench.errors import BenchError
from bench.models.base import ImageClassifier


def build_timm(name: str, info: DatasetInfo) -> ImageClassifier:
    """Any timm architecture, untrained, as a body with pooled features plus our linear head."""
    import timm

    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:10]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise BenchError(f"unknown timm model {name!r}{hint}")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": info.channels}
    try:
        body = timm.create_model(name, img_size=info.side, **kwargs)
    except TypeError:  # convolutional nets take any size and have no img_size argument
        body = timm.create_model(name, **kwargs)
    # With num_classes=0 timm returns pre-logits, which some heads widen (MobileNetV3's conv_head).
    features = getattr(body, "head_hidden_size", None) or body.num_features
    return ImageClassifier(body, features, info)
