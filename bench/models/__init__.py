"""Models: the ``ImageClassifier`` shape every model has, and one module per family."""
from bench.models.base import ImageClassifier, build_model

__all__ = ["ImageClassifier", "build_model"]
