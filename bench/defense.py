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
    """What ``Defense.run`` gets. Which parts a defense may use depends on its ``kind`` (see
    docs/protocol.md): post-training defenses learn from ``reserve``, training-time ones from
    ``train``; ``monitor`` measures test metrics for the report's curves, never for a decision.
    ``model`` is the cell's own copy: modify it in place or build a new one."""

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
    """What ``Defense.run`` returns. ``flagged`` holds indices into ``ctx.train`` of the samples
    the defense believes poisoned: given, the cell also reports detection precision, recall and
    FPR against the true poisoned indices (which the defense never sees); ``selection``, the units
it ablated, gets the selection-quality metrics the same way. ``details`` is stored
    with the cell and shown in the report; ``tensors`` are saved as ``defense.safetensors``."""

    model: nn.Module
    flagged: torch.Tensor | None = None   # training indices flagged as poisoned (detection metrics)
    history: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)          # JSON-serialisable, stored with the cell
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved as safetensors
    unchanged: bool = False               # the model is the undefended one (nothing to save)
    # Units the defense ablated (reset, pruned or masked) before any fine-tuning, keyed by the name
    # of the module whose output channels (dim 1) the ablation silences; a layer it analysed and
    # left alone maps to []. Given, the cell also measures selection quality against an oracle
    # that sees the ground truth the defense never sees (bench/metrics/selection.py).
    selection: dict[str, list[int]] | None = None


class Defense:
    """A defense: a class registered with ``@register_defense("name")``.

    ``Config`` is a dataclass of its hyper-parameters (each one settable and sweepable with
    ``-o defense.<name>.<field>=...``; check ranges in ``__post_init__`` with
    ``bench.config.require``). ``kind`` says what it may use: ``post-training`` (the undefended
    model and the clean reserve), ``training-time`` (the poisoned training set; it may train from
    scratch), ``data-free`` (the model alone) or ``reference``. ``version`` is part of every cell's
    id: bump it when a change alters results, so that stale cells are recomputed (a plugin from
    outside the project is identified by the sha256 of its source file as well). ``run(ctx)``
    gets a ``DefenseContext`` and returns a ``DefenseResult``; it is called once per cell, with
    the global torch seed set to the cell's seed."""

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
        """Defend: return the defended model (and, optionally, the flagged samples)."""
        raise NotImplementedError

    # What the report shows of the defense (recorded in the results store at run time, so a
    # report never needs the defense's code): its name in tables and legends; ``focus``: the
    # defense the benchmark centres on (the report's default focus: headline ASR reduction factor,
    # t-SNE panel, fixed colour); ``headline``: a sentence the report prints beside that factor.
    display_name: ClassVar[str] = ""
    focus: ClassVar[bool] = False
    headline: ClassVar[str] = ""
    # Figures a defense ships for its own cells: title and caption of their report section.
    report_figures_title: ClassVar[str] = ""
    report_figures_caption: ClassVar[str] = ""

    @classmethod
    def report_figures(cls, artifact_dir: Path, details: dict, poisoned_indices: torch.Tensor) -> list[Path] | None:
        """PNG figures of a cell, drawn into its artifact directory right after ``run`` (its
        ``defense.safetensors`` and ``history.json`` are there; ``details`` is the result's). The
        cell pipeline calls it with the stage's ground truth, ``poisoned_indices``, which the
        figures may show and the defense's run never sees. The report copies the PNGs it finds in
        the directory. None (the default): the defense has no figures of its own."""
        return None

    @classmethod
    def catalog(cls) -> dict:
        """What the report needs of this defense, recorded in the results store at run time."""
        return {"display": cls.display_name or cls.registered_name, "kind": cls.kind, "description": cls.description,
                "focus": cls.focus, "headline": cls.headline, "figures_title": cls.report_figures_title,
                "figures_caption": cls.report_figures_caption}
