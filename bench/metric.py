"""The metric API: a registered class with a ``Config`` dataclass, the ``columns`` it stores and
``measure(ctx)``.

A metric is measured on a cell after its defense ran: on the defended model, against ground
truth the defense never saw (the triggered test set, the poisoned indices, the undefended model).
Its settings are not part of the cell's identity: the cell's id covers the defense's computation
only, and each metric is recorded with a key of its own (name, version, settings, source). So a
new metric, a changed setting or a bumped metric version re-measures that metric on the finished
cells (from their stored models), and never re-runs a defense. ``-o metric.<name>.<field>=value``
sets a field for the whole grid; a profile may set budget-sized values (``Profile.metric_defaults``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.attack import Attack
    from bench.data.base import DatasetInfo, ImageSet
    from bench.spec import CellSpec
    from bench.workspace import Workspace

Direction = Literal["higher", "lower", "neither"]


@dataclass(frozen=True)
class Heatmap:
    """How the report draws a column as a defense x attack heatmap."""

    colormap: str
    vmin: float | None          # None: from the data (in steps of 10), so that drops stand out
    vmax: float
    center: float | None = None
    digits: int = 2
    needs_trigger: bool = True  # only attacks with a trigger have the value


@dataclass(frozen=True)
class Column:
    """One value a metric stores per cell: the key in the cell's ``metrics``, how tables and
    figures name it, and which way is better for a defense."""

    name: str
    display: str
    direction: Direction = "neither"
    unit: str = "%"
    description: str = ""
    heatmap: Heatmap | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MetricConfig:
    pass


@dataclass
class Measurement:
    """What ``Metric.measure`` returns: the values of its columns (a column left out, or None, is
    not defined for this cell: the report shows a dash) and JSON details, stored with the cell
    under the metric's name and shown by the report."""

    values: dict[str, float | int | None] = field(default_factory=dict)
    details: dict = field(default_factory=dict)


@dataclass
class MeasureContext:
    """What ``Metric.measure`` gets. ``model`` is the defended model, in eval mode; with
    ``unchanged`` it is the undefended one. Ground truth (``triggered``, ``poisoned_indices``) is
    for measuring only. Files a metric writes go to ``out_dir``, the cell's artifact directory
    (hashed and verified with the rest); ``shared`` is the workspace, whose ``shared_result``
    computes a value once per stage and reuses it in every cell of that stage."""

    spec: CellSpec
    model: nn.Module
    unchanged: bool
    attack: Attack
    info: DatasetInfo
    test: ImageSet
    triggered: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (images, true labels, targets); None: no trigger
    train: ImageSet                        # the training set as the attacker delivered it
    poisoned_indices: torch.Tensor
    flagged: torch.Tensor | None           # training indices the defense flagged
    selection: dict[str, list[int]] | None  # units the defense ablated (bench/defense.py)
    undefended_metrics: dict               # the attack stage's own C-ACC, ASR, RA
    undefended_model: Callable[[], nn.Module]  # a fresh copy of the stage's model, on the device
    device: torch.device
    out_dir: Path
    shared: Workspace
    log: Callable[[str], None] = print

    @property
    def seed(self) -> int:
        return self.spec.stage.seed

    @property
    def batch_size(self) -> int:
        return self.spec.stage.eval_batch_size


class Metric:
    """A metric: a class registered with ``@register_metric("name")``.

    ``columns`` declares what it stores (each ``Column`` becomes a column of ``results``, of the
    report's tables and, with a ``heatmap``, a figure); ``title`` and ``description`` head its
    section of the report. ``Config`` is a dataclass of its settings, with their one default
    (``-o metric.<name>.<field>=value``). ``applies(cell)`` says on which cells it is measured,
    from the cell's spec alone (before any work); ``measure(ctx)`` measures it on a finished
    defense and returns a ``Measurement``. ``version``: bump it when a change alters what it
    measures, so finished cells are re-measured (a plugin file's sha256 does the same)."""

    Config: ClassVar[type] = MetricConfig
    columns: ClassVar[tuple[Column, ...]] = ()
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    registered_name: ClassVar[str] = "?"

    def __init__(self, config) -> None:
        self.config = config

    def applies(self, cell: CellSpec) -> bool:
        """Whether the cell gets this metric (default: every cell)."""
        return True

    def measure(self, ctx: MeasureContext) -> Measurement:
        raise NotImplementedError

    @classmethod
    def catalog(cls) -> dict:
        """What the report needs of this metric, recorded in the results store at run time."""
        return {"title": cls.title or cls.registered_name, "description": cls.description, "version": cls.version,
                "columns": [column.to_json() for column in cls.columns]}
