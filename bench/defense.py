"""The defense API: a registered class with a ``Config`` dataclass and ``run(ctx)``.

Post-training defenses use ``ctx.model`` (the cached undefended model) and ``ctx.reserve``
(5% clean). Training-time defenses use ``ctx.train`` (poisoned, exactly as the attacker
delivered it) and may build fresh models. Nothing here exposes which samples are
poisoned; ``ctx.monitor`` measures test metrics for training curves only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from bench import engine
from bench.data.base import DatasetInfo, ImageSet

DefenseKind = Literal["reference", "post-training", "training-time", "data-free"]


@dataclass
class DefenseConfig:
    pass


@dataclass
class DefenseContext:
    model: nn.Module                      # a private copy of the undefended model, on the device
    build_model: Callable[[], nn.Module]  # a fresh untrained model of the cell's architecture
    train: ImageSet                       # the poisoned training set (training-time defenses)
    reserve: ImageSet                     # the clean 5% reserve (post-training defenses)
    info: DatasetInfo
    train_config: engine.TrainConfig      # the attack stage's recipe (to retrain from scratch)
    finetune_config: engine.TrainConfig   # the profile's fine-tuning recipe (epochs, lr, batch)
    device: torch.device
    seed: int
    artifact_dir: Path                    # write diagnostics here; the report picks them up
    monitor: engine.EpochCallback | None = None
    log: Callable[[str], None] = print

    def finetune_recipe(self, **changes) -> engine.TrainConfig:
        """The profile's fine-tuning recipe with the defense's own settings; None keeps the default."""
        return replace(self.finetune_config, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class DefenseResult:
    model: nn.Module
    flagged: torch.Tensor | None = None   # training indices flagged as poisoned (detection metrics)
    history: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)          # JSON-serialisable, stored with the cell
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved as safetensors
    unchanged: bool = False               # the model is the undefended one (nothing to save)


class Defense:
    Config: ClassVar[type] = DefenseConfig
    description: ClassVar[str] = ""
    kind: ClassVar[DefenseKind] = "post-training"
    version: ClassVar[str] = "1"  # bump when behaviour changes: it is part of every cell's identity
    registered_name: ClassVar[str] = "?"
    # Settings the defense itself prescribes for some attack rows, e.g. NONE's natural preset on
    # ``benign``; profile defaults and the user's overrides win over these.
    defaults_for_attack: ClassVar[dict[str, dict]] = {}

    def __init__(self, config, seed: int) -> None:
        self.config = config
        self.seed = seed

    @classmethod
    def check(cls, config, train: engine.TrainConfig, finetune: engine.TrainConfig) -> None:
        """Refuse, with a ValueError naming the field, a config that cannot work with the cell's
        recipes (the attack stage's ``train``, the profile's ``finetune``). Called when the grid
        is expanded, before any work starts; field ranges belong in the Config's __post_init__."""

    def run(self, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError
