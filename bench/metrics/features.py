"""Penultimate features of test images, stored with each cell as ``features.safetensors`` for the
report's t-SNE (bench/reporting/tsne.py embeds them; it never rebuilds a model). A measurement
with no column: it adds a figure, not a number."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from bench import engine
from bench.config import require
from bench.data.base import ImageSet
from bench.metric import MeasureContext, Measurement, Metric
from bench.registry import register_metric


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, test: ImageSet, triggered, samples: int, seed: int,
                         batch_size: int) -> dict[str, torch.Tensor]:
    """Penultimate features of ``samples`` clean test images and as many triggered ones (the same
    images for every cell of a stage), with their true labels, the attack's targets and the model's
    predictions."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randperm(len(test), generator=generator)[:samples].to(test.x.device)
    parts = {"clean": (test.x[clean], test.y[clean], torch.full((len(clean),), -1, dtype=torch.long, device=test.y.device))}
    if triggered is not None:
        x_trig, y_true, y_target = triggered
        chosen = torch.randperm(len(x_trig), generator=generator)[:samples].to(x_trig.device)
        parts["triggered"] = (x_trig[chosen], y_true[chosen], y_target[chosen])
    x = torch.cat([part[0] for part in parts.values()])
    features = engine.infer(model, x, lambda batch: model.features(batch).flatten(1).float(), batch_size)
    predicted = model.classifier(features).argmax(1)  # from the same pass: the head is one linear layer
    return {"features": features.cpu(), "labels": torch.cat([part[1] for part in parts.values()]).cpu().long(),
            "targets": torch.cat([part[2] for part in parts.values()]).cpu().long(),
            "predicted": predicted.cpu(),
            "triggered": torch.cat([torch.full((len(part[0]),), name == "triggered") for name, part in parts.items()])}


@dataclass
class FeaturesConfig:
    # Clean test images, and as many triggered ones, whose features the cell stores; 0: off.
    samples: int = 300

    def __post_init__(self) -> None:
        require(self, samples=">= 0")


@register_metric("features")
class Features(Metric):
    """Penultimate features of clean and triggered test images, for the report's t-SNE.

    Stored by every cell whose model has ``features`` and ``classifier`` (every ``ImageClassifier``)."""

    Config = FeaturesConfig
    title = "t-SNE of penultimate features"

    def measure(self, ctx: MeasureContext) -> Measurement:
        samples = self.config.samples
        model = ctx.model
        if samples == 0 or not (hasattr(model, "features") and hasattr(model, "classifier")):
            return Measurement()
        save_file(penultimate_features(model, ctx.test, ctx.triggered, samples, ctx.seed, ctx.batch_size),
                  str(ctx.out_dir / "features.safetensors"))
        return Measurement(details={"samples": samples})
