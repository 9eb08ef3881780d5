"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma, NeurIPS 2021).

A training-time defense: it trains its own model from scratch on the poisoned set.
It rests on backdoor samples being learned much faster than clean ones:

1. Isolation: the first epochs use local gradient ascent (LGA) — the loss is
   sign(L - gamma) * L on each batch's mean cross-entropy L, so once a batch's loss
   falls under gamma (0.5) the model ascends instead. Clean samples hover around
   gamma; backdoor samples, learned through a shortcut, sink far below it.
2. The ``isolation_ratio`` (1%) of training samples with the lowest loss under that
   model are isolated as presumed backdoor samples (recorded as ``flagged``).
3. Training continues on the other 99% with plain cross-entropy (the authors' code
   does this "fine-tuning" before unlearning; the backdoor is typically re-learnt here
   from the poisoned samples that were not isolated).
4. Unlearning: gradient ascent (negated cross-entropy) on the isolated samples only,
   at lr 5e-4, without augmentation, for a few epochs — which breaks the shared
   trigger -> target shortcut.

Cost is kept comparable to the attack stage: isolation + continued training together
take the attack recipe's epochs (isolation = 20% of them by default; the authors' code
isolates for 10 epochs and then trains 60 more); the unlearning epochs pass over 1% of
the data each and are extra. The isolation epochs run at the recipe's constant lr (the
authors hold it constant in this phase; a schedule that decays within two epochs would
stop LGA from acting), and the continued training uses the recipe's own schedule over
its epochs. Unlearning runs with BatchNorm in training mode, as the authors' code does:
batches made only of isolated samples are what gives the ascent a gradient (in eval
mode their loss is ~0 and lr 5e-4 never moves it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.config import require
from bench.data.base import ImageSet
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.device import autocast
from bench.registry import register_defense


@dataclass
class ABLConfig(DefenseConfig):
    gamma: float = 0.5                    # LGA flooding level
    isolation_ratio: float = 0.01
    isolation_epochs: int | None = None   # None: 20% of the attack recipe's epochs (at least 1)
    unlearning_epochs: int = 5
    unlearning_lr: float = 5e-4

    def __post_init__(self) -> None:
        require(self, gamma=">= 0", isolation_ratio="(0, 1)", isolation_epochs=">= 1", unlearning_epochs=">= 1",
                unlearning_lr="> 0")


def phase_view(data: ImageSet, offset: int, total: int) -> ImageSet:
    """The training set as one phase of a ``total``-epoch run starting at epoch ``offset``.

    An attack's epoch schedule (slow poisoning) ramps over the whole training run; each
    ABL phase is its own engine.train call, so it must see the schedule's global epochs,
    not restart the ramp."""
    if data.schedule is None:
        return data
    schedule = data.schedule
    return replace(data, schedule=lambda epoch, epochs: schedule(offset + epoch, total))


@torch.no_grad()
def per_sample_loss(model: nn.Module, data, batch_size: int) -> torch.Tensor:
    """Cross-entropy of every training sample as delivered (dynamic triggers applied), no augmentation."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for _, x, y in data.batches(batch_size):
        with autocast(device):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none"))
    return torch.cat(losses)


@register_defense("abl")
class AntiBackdoorLearning(Defense):
    """Train from scratch with LGA, isolate the 1% lowest-loss samples, train on, unlearn them by gradient ascent."""

    Config = ABLConfig
    kind = "training-time"
    version = "1"

    @staticmethod
    def isolation_epochs(cfg: ABLConfig, total: int) -> int:
        return cfg.isolation_epochs if cfg.isolation_epochs is not None else max(1, round(0.2 * total))

    @classmethod
    def check(cls, config: ABLConfig, train, finetune) -> None:
        isolation_epochs = cls.isolation_epochs(config, train.epochs)
        if isolation_epochs >= train.epochs:
            raise ValueError(f"isolation_epochs ({isolation_epochs}) must be fewer than the training recipe's "
                             f"{train.epochs} epochs, so training continues after isolation")

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: ABLConfig = self.config
        total = ctx.train_config.epochs
        isolation_epochs = self.isolation_epochs(cfg, total)
        self.check(cfg, ctx.train_config, ctx.finetune_config)
        model = ctx.build_model()
        gamma = cfg.gamma

        def lga(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            return torch.sign(loss - gamma) * loss

        isolation = engine.train(model, phase_view(ctx.train, 0, total), replace(ctx.train_config, epochs=isolation_epochs, schedule="constant"),
                                 ctx.info, seed=ctx.seed, loss_fn=lga, on_epoch_end=ctx.monitor, desc="abl isolation")

        losses = per_sample_loss(model, ctx.train, ctx.train_config.batch_size)
        count = max(1, round(cfg.isolation_ratio * len(losses)))
        isolated = torch.sort(torch.topk(losses, count, largest=False).indices).values
        keep = torch.ones(len(losses), dtype=torch.bool, device=losses.device)
        keep[isolated] = False
        remaining = torch.nonzero(keep).flatten()
        ctx.log(f"isolated {count} samples (loss <= {float(losses[isolated].max()):.4f})")

        training = engine.train(model, phase_view(ctx.train, isolation_epochs, total), replace(ctx.train_config, epochs=total - isolation_epochs),
                                ctx.info, seed=ctx.seed + 1, on_epoch_end=ctx.monitor, indices=remaining,
                                desc="abl training")

        def ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(model(x), y)

        unlearn_recipe = replace(ctx.train_config, epochs=cfg.unlearning_epochs, lr=cfg.unlearning_lr,
                                 schedule="constant", augment=False)
        # The isolated samples are in the defender's hands as a set: no epoch schedule applies.
        unlearning = engine.train(model, replace(ctx.train, schedule=None), unlearn_recipe, ctx.info, seed=ctx.seed + 2, loss_fn=ascent,
                                  on_epoch_end=ctx.monitor, indices=isolated, desc="abl unlearning")

        for phase, records in (("isolation", isolation), ("training", training), ("unlearning", unlearning)):
            for record in records:
                record["phase"] = phase
        details = {
            "isolation_epochs": isolation_epochs,
            "training_epochs": total - isolation_epochs,
            "unlearning_epochs": cfg.unlearning_epochs,
            "unlearning_lr": cfg.unlearning_lr,
            "gamma": gamma,
            "isolated": count,
            "isolation_loss_max": round(float(losses[isolated].max()), 6),
            "median_train_loss_after_isolation": round(float(losses.median()), 6),
        }
        return DefenseResult(model=model, flagged=isolated.cpu(), history=isolation + training + unlearning,
                             details=details, tensors={"isolation_loss": losses.cpu()})
