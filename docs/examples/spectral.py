"""Spectral Signatures as a --plugin file: the complete example of docs/plugins.md (generated into it
by `make readme`; tests/test_core.py runs it).

    python -m bench run --plugin docs/examples/spectral.py --defenses undefended,spectral --attacks badnets
"""
from dataclasses import dataclass, replace

import torch

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseResult
from bench.registry import register_defense


@dataclass
class SpectralConfig:
    poison_rate: float = 0.1   # the share of poisoned samples the defender assumes
    removal_factor: float = 1.5
    epochs: int | None = None  # retraining; None: the attack stage's recipe

    def __post_init__(self) -> None:
        require(self, poison_rate="(0, 1)", removal_factor="> 0", epochs=">= 1")


@register_defense("spectral")
class SpectralSignatures(Defense):
    """Spectral Signatures (Tran et al. 2018): drop each class's outliers along its top singular direction, retrain."""

    Config = SpectralConfig
    kind = "training-time"

    @torch.no_grad()
    def scores(self, model, data) -> torch.Tensor:
        model.eval()
        features = torch.cat([model.features(x) for _, x, _ in data.batches(512)])
        scores = torch.zeros(len(data), device=features.device)
        for label in data.y.unique():
            members = torch.nonzero(data.y == label).flatten()
            centred = features[members] - features[members].mean(0)
            direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            scores[members] = (centred @ direction) ** 2
        return scores

    def run(self, ctx):
        scores = self.scores(ctx.model, ctx.train)
        flagged = []
        for label in ctx.train.y.unique():
            members = torch.nonzero(ctx.train.y == label).flatten()
            count = int(self.config.removal_factor * self.config.poison_rate * len(members))
            flagged.append(members[scores[members].topk(count).indices])
        flagged = torch.sort(torch.cat(flagged)).values
        keep = torch.ones(len(ctx.train), dtype=torch.bool, device=flagged.device)
        keep[flagged] = False
        model = ctx.build_model()
        recipe = ctx.train_config if self.config.epochs is None else replace(ctx.train_config, epochs=self.config.epochs)
        history = engine.train(model, ctx.train, recipe, ctx.info, seed=self.seed,
                               indices=torch.nonzero(keep).flatten(), on_epoch_end=ctx.monitor)
        return DefenseResult(model, flagged=flagged, history=history,
                             details={"removed": len(flagged), "kept": int(keep.sum())})
