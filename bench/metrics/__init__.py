"""Every metric a cell stores, declared once: its name, display name, direction, group and how
the report draws it. The computations live beside this table, one module per kind:

- ``accuracy``: C-ACC, ASR, RA and DER from the model's predictions (docs/protocol.md, "Metrics");
- ``detection``: precision, recall and FPR of the samples a defense flags, against ground truth;
- ``reasr``: REASR by trigger inversion, the natural-backdoor metric;
- ``selection``: did a unit-selecting defense hit the backdoor's units (an evaluation-only oracle).

The report reads this table (``METRICS``) for its columns, names and heatmaps, so a new metric
is declared here and computed in its module; nothing in ``bench/report`` names a metric group.
Importing this package imports no heavy module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower", "neither"]
Group = Literal["main", "detection", "scan", "selection"]


@dataclass(frozen=True)
class Heatmap:
    """How the report draws a metric as a defense x attack heatmap."""

    colormap: str
    vmin: float | None          # None: from the data (in steps of 10), so that drops stand out
    vmax: float
    center: float | None = None
    digits: int = 2
    needs_trigger: bool = True  # only attacks with a trigger have the metric


@dataclass(frozen=True)
class Metric:
    name: str                   # the key in a cell's stored ``metrics``
    display: str                # how tables and figures name it
    group: Group
    direction: Direction        # which way is better for a defense
    unit: str = "%"
    description: str = ""
    heatmap: Heatmap | None = None

    @property
    def axis_label(self) -> str:
        return f"{self.display} ({self.unit})" if self.unit else self.display


METRICS: dict[str, Metric] = {}


def _declare(*metrics: Metric) -> None:
    for metric in metrics:
        METRICS[metric.name] = metric


_declare(
    Metric("c_acc", "C-ACC", "main", "higher", description="accuracy on the clean test set",
           heatmap=Heatmap("RdYlGn", None, 100.0, needs_trigger=False)),
    Metric("asr", "ASR", "main", "lower", description="triggered test samples sent to the target",
           heatmap=Heatmap("Reds", 0.0, 100.0)),
    Metric("ra", "RA", "main", "higher", description="triggered test samples still given their true label"),
    Metric("der", "DER", "main", "higher", unit="", description="defense effectiveness rating in [0, 1]; 0.5: no change",
           heatmap=Heatmap("RdYlGn", 0.0, 1.0, center=0.5, digits=4)),
    Metric("det_precision", "precision", "detection", "higher", description="flagged samples that are poisoned"),
    Metric("det_recall", "recall", "detection", "higher", description="poisoned samples flagged"),
    Metric("det_fpr", "FPR", "detection", "lower", description="clean samples flagged"),
    Metric("det_flagged", "flagged", "detection", "neither", unit="", description="samples flagged"),
    Metric("reasr", "REASR", "scan", "lower",
           description="max over mask-size bounds of the inverted trigger's success on held-out images"),
    Metric("sel_asr", "selection ASR", "selection", "lower",
           description="ASR of the undefended model after ablating the defense's selected units only"),
    Metric("oracle_asr", "oracle ASR", "selection", "lower",
           description="ASR after ablating as many units per layer, chosen by their own effect on ASR"),
    Metric("sel_recall", "selection recall", "selection", "higher",
           description="share of the oracle's top units that the defense selected"),
)


def names(group: Group) -> tuple[str, ...]:
    """The metrics of one group, in declaration order."""
    return tuple(name for name, metric in METRICS.items() if metric.group == group)


def display(name: str) -> str:
    metric = METRICS.get(name)
    return metric.display if metric else name
