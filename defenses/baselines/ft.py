"""Fine-tuning (FT): the simplest post-training baseline, and the second half of Fine-Pruning.

The undefended model is trained further on the clean reserve only. Catastrophic
forgetting of the trigger is what the field hopes for; Liu et al. (2018, Fine-Pruning)
found it often does not happen, because clean data rarely activates the neurons that
carry the backdoor, so their weights barely move.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.registry import register_defense


@dataclass
class FineTuningConfig(DefenseConfig):
    epochs: int | None = None   # None: the profile's fine-tuning epochs
    lr: float | None = None     # None: the profile's fine-tuning lr (0.01, cosine, as BackdoorBench's FT)

    def __post_init__(self) -> None:
        require(self, epochs=">= 1", lr="> 0")


@register_defense("ft")
class FineTuning(Defense):
    """Fine-tune the undefended model on the clean 5% reserve with the profile's recipe."""

    Config = FineTuningConfig
    kind = "post-training"
    version = "1"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        recipe = ctx.finetune_recipe(epochs=self.config.epochs, lr=self.config.lr)
        model = ctx.model
        history = engine.train(model, ctx.reserve, recipe, ctx.info, seed=ctx.seed,
                               on_epoch_end=ctx.monitor, desc="ft")
        return DefenseResult(model=model, history=history,
                             details={"epochs": recipe.epochs, "lr": recipe.lr, "reserve_size": len(ctx.reserve)})
