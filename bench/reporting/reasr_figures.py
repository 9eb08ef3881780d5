"""Figures of the trigger-inversion scan: REASR against the size bound, and the reversed triggers.

Both return a ``matplotlib.figure.Figure`` (no pyplot), so drawing neither needs nor changes
the caller's backend; the report draws them inside its own style and saves them with
``bench.reporting.figures.save`` like every other figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch
from matplotlib.figure import Figure


class Triggers(Protocol):
    """What the trigger grid needs: a ``bench.metrics.reasr.ScanResult`` or ``StoredTriggers``."""

    bounds: tuple[float, ...]
    masks: torch.Tensor       # (bounds, 1, H, W)
    patterns: torch.Tensor    # (bounds, C, H, W)
    reasr: Mapping[float, float]
    best_label: Mapping[float, int]


@dataclass
class StoredTriggers:
    """A cell's reversed triggers as stored: the tensors of its ``scan.safetensors`` and the
    per-bound REASR and labels of its ``details["scan"]`` (JSON keys are bound strings)."""

    bounds: tuple[float, ...]
    masks: torch.Tensor
    patterns: torch.Tensor
    reasr: dict[float, float] = field(default_factory=dict)
    best_label: dict[float, int] = field(default_factory=dict)

    @classmethod
    def from_stored(cls, tensors: Mapping[str, torch.Tensor], details: Mapping) -> "StoredTriggers":
        def tensor(name: str) -> torch.Tensor:  # names as ScanResult.tensors() writes them
            found = tensors.get(f"scan_{name}")
            if found is None:
                raise KeyError(f"no {name!r} tensor among {sorted(tensors)}")
            return found

        # Bounds are saved as float32 (0.02 -> 0.0199999...): round-trip through the JSON key
        # format so that they match the keys of ``details``.
        bounds = tuple(float(f"{float(b):g}") for b in tensor("bounds").tolist())
        return cls(bounds=bounds, masks=tensor("masks"), patterns=tensor("patterns"),
                   reasr=_by_bound(details.get("reasr") or {}), best_label=_by_bound(details.get("best_label") or {}))


def _by_bound(values: Mapping) -> dict:
    return {float(b): v for b, v in values.items()}


def plot_reasr(curves: Mapping[str, Mapping[float, float]], title: str = "", *,
               colors: Mapping[str, str] | None = None, errors: Mapping[str, Mapping[float, float]] | None = None) -> Figure:
    """One line per model (e.g. per defense): REASR (%) against the mask bound (% of the image area).

    Bounds may be floats or their JSON strings. ``colors``: a fixed colour per name; ``errors``:
    a std per name and bound (over seeds), drawn as error bars."""
    fig = Figure(figsize=(5.6, 3.6))
    ax = fig.subplots()
    for name, curve in curves.items():
        points = sorted(_by_bound(curve).items())
        spread = _by_bound((errors or {}).get(name) or {})
        yerr = [spread.get(b, math.nan) for b, _ in points]
        yerr = None if all(math.isnan(e) for e in yerr) else [0.0 if math.isnan(e) else e for e in yerr]
        ax.errorbar([100 * b for b, _ in points], [v for _, v in points], yerr=yerr, marker="o", capsize=3,
                    label=name, color=(colors or {}).get(name))
    ax.set_xlabel("trigger size bound (% of image area)")
    ax.set_ylabel("REASR (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _preview(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The trigger as it would look stamped on a mid-grey image, HxWxC for imshow."""
    image = (1 - mask) * 0.5 + mask * pattern
    image = image.clamp(0, 1).permute(1, 2, 0)
    return image.squeeze(-1) if image.shape[-1] == 1 else image


def _bound_index(bounds: tuple[float, ...], bound: float) -> int | None:
    # isclose: bounds of different cells may come from float32 tensors or from JSON keys
    return next((i for i, b in enumerate(bounds) if math.isclose(b, bound, rel_tol=1e-6)), None)


def trigger_grid(results: Mapping[str, Triggers], title: str = "") -> Figure:
    """Rows: models (e.g. defenses); columns: bounds. Each cell shows the best candidate's
    reversed trigger stamped on grey, titled with its label and REASR. ``results`` hold
    ``ScanResult``s or ``StoredTriggers`` (what a cell stored)."""
    names = list(results)
    bounds = sorted({float(f"{b:g}") for r in results.values() for b in r.bounds})
    fig = Figure(figsize=(1.6 * len(bounds) + 1, 1.8 * len(names) + 0.4))
    axes = fig.subplots(len(names), len(bounds), squeeze=False)
    for row, name in enumerate(names):
        result = results[name]
        for col, bound in enumerate(bounds):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)  # a style's grid lines would be drawn over the image
            i = _bound_index(tuple(result.bounds), bound)
            if i is not None:
                image = _preview(result.masks[i].float(), result.patterns[i].float())
                ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None, vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_title(_trigger_title(result, result.bounds[i]), fontsize=7)
            else:
                ax.axis("off")
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _trigger_title(result: Triggers, bound: float) -> str:
    """``bound%: y=label REASR%``, with what is known (a stored cell may lack labels)."""
    label = _lookup(result.best_label, bound)
    value = _lookup(result.reasr, bound)
    text = f"{100 * bound:g}%:"
    text += f" y={label}" if label is not None else ""
    text += f" {value:.1f}%" if value is not None else ""  # one decimal: low REASRs are the ones compared
    return text


def _lookup(values: Mapping[float, object], bound: float):
    return next((v for b, v in values.items() if math.isclose(float(b), bound, rel_tol=1e-6)), None)
