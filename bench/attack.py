"""The attack API. An attack poisons the training set (statically, or per batch) and
stamps its trigger on test images; the attack stage trains the undefended model.

Subclasses implement ``apply_trigger`` (batched, on the device, float images in [0, 1]);
dynamic or learned attacks also override ``poison`` / ``prepare`` / ``train_model``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from bench import engine
from bench.config import require
from bench.data.base import DatasetInfo, ImageSet, to_unit
from bench.errors import BenchError


@dataclass
class AttackConfig:
    """The settings every attack has; an attack's own ``Config`` extends it."""

    poison_rate: float = 0.10
    target: int = 0
    target_mode: Literal["all-to-one", "all-to-all"] = "all-to-one"
    # "slow": poisoned samples enter training along a linear ramp (see Attack.slow_schedule).
    schedule: Literal["standard", "slow"] = "standard"

    def __post_init__(self) -> None:
        require(self, poison_rate="[0, 1]", target=">= 0")


@dataclass
class Poisoned:
    """What the attacker hands over: the training set, and (for the metrics only) the truth."""

    train: ImageSet
    poisoned_indices: torch.Tensor
    requested_rate: float
    achieved_rate: float


@dataclass
class AttackContext:
    """What an attack stage may use besides the training set."""

    info: DatasetInfo
    device: torch.device
    seed: int
    train_config: engine.TrainConfig
    build_model: Callable[[], nn.Module]
    # A clean model of the same (dataset, model, seed, profile), trained by the ``benign``
    # stage and cached: for attacks optimised against a model (TrojanNN).
    benign_model: Callable[[], nn.Module]
    on_epoch_end: engine.EpochCallback | None = None


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Attack:
    """An attack: a class registered with ``@register_attack("name")``, with a ``Config``
    dataclass that extends ``AttackConfig`` (poison rate, target, all-to-one or all-to-all,
    slow poisoning).

    A static attack implements ``apply_trigger(x, y)``: float images in [0, 1], batched, on
    their device, returning the stamped images; ``poison`` stamps and relabels the chosen samples
    once. An attack that learns its trigger does it in ``prepare`` (before poisoning; TrojanNN
    optimises against ``ctx.benign_model()``) or in ``train_model`` (while the undefended model
    trains; Input-Aware), stores what it learned in ``state_dict`` / ``load_state_dict`` (saved
    with the stage, so a defense cell recreates the exact trigger), and a dynamic attack returns
    an ``ImageSet`` whose ``transform`` stamps per batch. ``version`` works as for defenses."""

    Config: ClassVar[type[AttackConfig]] = AttackConfig
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bump when behaviour changes: it is part of every cell's identity
    clean_label: ClassVar[bool] = False
    has_trigger: ClassVar[bool] = True  # False only for ``benign``
    # True when train_model changes the trigger itself (Input-Aware trains its generator with the
    # model): a triggered test set made before training is stale and must be made again after it.
    trigger_trained_with_model: ClassVar[bool] = False

    def __init__(self, config: AttackConfig, info: DatasetInfo, seed: int) -> None:
        self.config = config
        self.info = info
        self.seed = seed
        if not 0 <= config.target < info.num_classes:
            raise BenchError(f"attack target {config.target} is not a class of {info.name} (0..{info.num_classes - 1})")

    # --- the trigger -------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on float images in [0, 1] (batched, on their device)."""
        raise NotImplementedError

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The labels the backdoor sends ``y`` to: the target, or (all-to-all) the next class."""
        if self.config.target_mode == "all-to-all":
            return (y + 1) % self.info.num_classes
        return torch.full_like(y, self.config.target)

    # --- poisoning ---------------------------------------------------------------------
    def generator(self, purpose: str) -> torch.Generator:
        """A seeded generator per purpose, so each random choice is reproducible on its own."""
        salt = sum(ord(c) * 31 ** i for i, c in enumerate(f"{type(self).__name__}/{purpose}")) % (2**31)
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def candidate_indices(self, y: torch.Tensor) -> torch.Tensor:
        y = y.cpu()
        if self.clean_label:
            return torch.nonzero(y == self.config.target).flatten()
        if self.config.target_mode == "all-to-one":
            return torch.nonzero(y != self.config.target).flatten()
        return torch.arange(len(y))

    def choose_poison_indices(self, y: torch.Tensor) -> torch.Tensor:
        """``poison_rate`` of the training set, drawn from the eligible samples (never more)."""
        candidates = self.candidate_indices(y)
        wanted = round(self.config.poison_rate * len(y))
        chosen = candidates[torch.randperm(len(candidates), generator=self.generator("indices"))[:wanted]]
        return torch.sort(chosen).values

    def prepare(self, train: ImageSet, ctx: AttackContext) -> None:
        """Fit whatever the trigger needs before poisoning (e.g. optimise a pattern)."""

    def poison(self, train: ImageSet) -> Poisoned:
        """Static poisoning: stamp and relabel the chosen samples once."""
        indices = self.choose_poison_indices(train.y)
        x, y = train.x.clone(), train.y.clone()
        on_device = indices.to(x.device)
        for start in range(0, len(on_device), 1024):
            chunk = on_device[start:start + 1024]
            x[chunk] = to_uint8(self.apply_trigger(to_unit(x[chunk]), y[chunk]))
            if not self.clean_label:
                y[chunk] = self.target_labels(y[chunk])
        schedule = self.slow_schedule(len(y), indices) if self.config.schedule == "slow" else None
        return Poisoned(ImageSet(x, y, schedule=schedule), indices, self.config.poison_rate, len(indices) / max(len(y), 1))

    def slow_schedule(self, num_samples: int, poisoned: torch.Tensor):
        """Slow poisoning: in epoch e of E, the first ceil(n * min(1, (e+1) / ceil(E/2))) poisoned
        samples (in a seeded order) take part; all clean samples always do. The full poison
        set is present from mid-training on, so backdoor and clean features are learned at a
        similar pace."""
        order = poisoned[torch.randperm(len(poisoned), generator=self.generator("slow"))]
        clean = torch.ones(num_samples, dtype=torch.bool)
        clean[poisoned] = False
        clean_indices = torch.nonzero(clean).flatten()

        def active(epoch: int, epochs: int) -> torch.Tensor:
            ramp_epochs = max(1, math.ceil(epochs / 2))
            count = math.ceil(len(order) * min(1.0, (epoch + 1) / ramp_epochs))
            return torch.cat([clean_indices, order[:count]])

        return active

    # --- the attack stage --------------------------------------------------------------
    def train_model(self, model: nn.Module, poisoned: Poisoned, ctx: AttackContext) -> list[dict]:
        """Train the undefended model on the poisoned set (override when the trigger trains with it)."""
        return engine.train(model, poisoned.train, ctx.train_config, ctx.info, seed=ctx.seed,
                            on_epoch_end=ctx.on_epoch_end, desc=f"attack {self.registered_name}")

    # --- evaluation --------------------------------------------------------------------
    def evaluation_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Test samples ASR is measured on: all for all-to-all, the non-target ones otherwise."""
        if self.config.target_mode == "all-to-all":
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.config.target

    @torch.no_grad()
    def triggered_test_set(self, test: ImageSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(triggered uint8 images, true labels, attack targets) over the evaluation mask."""
        keep = torch.nonzero(self.evaluation_mask(test.y)).flatten()
        x, y = test.x[keep], test.y[keep]
        out = torch.empty_like(x)
        for start in range(0, len(x), 1024):
            sl = slice(start, start + 1024)
            out[sl] = to_uint8(self.apply_trigger(to_unit(x[sl]), y[sl]))
        return out, y, self.target_labels(y)

    def details(self) -> dict:
        """JSON-able facts about how this stage's trigger was made (e.g. an optimised or a fixed pattern)."""
        return {}

    # --- learned state (patterns, generators) stored with the attack stage -------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of what the attack learned (patterns, generator weights), saved with the stage."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict``'s tensors, so the trigger is recreated exactly."""

    registered_name: ClassVar[str] = "?"
