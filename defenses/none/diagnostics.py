"""NONE's per-cell diagnostics figure: channel scores per layer (selected neurons marked)
and the per-sample detection score histogram with the Jenks break.

The defense never sees which samples are poisoned, so it writes the figure without the
split; the cell pipeline then redraws it, through ``NONE.report_figures``, with the histogram
split by ground truth (bench/cell.py, ``draw_defense_figures``); ``render_diagnostics(cell_dir,
poisoned_indices)`` redraws a finished cell's figure from what it stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FIGURE_NAME = "none_diagnostics.png"


def render_diagnostics(artifact_dir: str | Path, poisoned_indices: torch.Tensor | None = None) -> Path:
    """Redraw a finished cell's figure from its ``defense.safetensors`` and ``result.json``,
    with the detection histogram split by ground truth when ``poisoned_indices`` is given."""
    from safetensors.torch import load_file

    artifact_dir = Path(artifact_dir)
    tensors = load_file(str(artifact_dir / "defense.safetensors"))
    with open(artifact_dir / "result.json") as handle:
        details = json.load(handle)["details"]
    return render(artifact_dir, tensors, details, poisoned_indices)


def render(artifact_dir: str | Path, tensors: dict[str, torch.Tensor], details: dict,
           poisoned_indices: torch.Tensor | None = None) -> Path:
    rounds = details["rounds"]
    shown = [rounds[0]] if len(rounds) == 1 else [rounds[0], rounds[-1]]
    layers = [layer["name"] for layer in details["graph"]["layers"]]
    offsets = tensors["layer_offsets"].tolist()
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, safe in workers
    )

    figure = Figure(figsize=(13, 4.2 * len(shown)), layout="constrained")
    axes = figure.subplots(len(shown), 2, squeeze=False)
    for row, record in enumerate(shown):
        prefix = f"round{record['round']}"
        _channel_panel(axes[row][0], tensors[f"{prefix}.channel_scores"].numpy(), offsets, layers, record)
        _sample_panel(axes[row][1], tensors[f"{prefix}.sample_scores"].numpy(), record, poisoned_indices)
    settings = details.get("settings", {})
    figure.suptitle(f"NONE diagnostics (reset fraction {settings.get('max_reset_fraction')}, "
                    f"lr {settings.get('finetune_lr')}, {len(rounds)} round(s))")
    path = Path(artifact_dir) / FIGURE_NAME
    figure.savefig(path, dpi=110)
    return path


def _channel_panel(ax, scores: np.ndarray, offsets: list[int], layers: list[str], record: dict) -> None:
    selected = {(item["layer"], item["channel"]) for item in record["selected"]}
    rng = np.random.default_rng(0)
    for index, name in enumerate(layers):
        values = scores[offsets[index]:offsets[index + 1]]
        mask = np.array([(name, c) in selected for c in range(len(values))], dtype=bool)
        x = index + rng.uniform(-0.25, 0.25, len(values))
        ax.scatter(x[~mask], values[~mask], s=6, color="0.6", label="channel" if index == 0 else None)
        ax.scatter(x[mask], values[mask], s=22, color="crimson", marker="x",
                   label="selected (reset)" if index == 0 else None)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([_short(name) for name in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channel score (max gap)")
    ax.set_title(f"round {record['round']}: channel scores per analysed layer")
    ax.legend(fontsize=8, loc="upper left")


def _sample_panel(ax, scores: np.ndarray, record: dict, poisoned: torch.Tensor | None) -> None:
    bins = np.histogram_bin_edges(scores, bins=80)
    if poisoned is None:
        ax.hist(scores, bins=bins, color="steelblue", label="all samples")
    else:
        truth = np.zeros(len(scores), dtype=bool)
        truth[poisoned.cpu().long().numpy()] = True
        ax.hist(scores[~truth], bins=bins, color="steelblue", alpha=0.75, label=f"clean ({(~truth).sum()})")
        ax.hist(scores[truth], bins=bins, color="crimson", alpha=0.75, label=f"poisoned ({truth.sum()})")
    if record.get("jenks_break") is not None:
        ax.axvline(record["jenks_break"], color="black", linestyle="--",
                   label=f"Jenks break ({record['flagged']} flagged)")
    ax.set_yscale("log")
    ax.set_xlabel("detection score (sum of top channels' activations)")
    ax.set_ylabel("samples")
    ax.set_title(f"round {record['round']}: per-sample detection score")
    ax.legend(fontsize=8)


def _short(name: str) -> str:
    return name[5:] if name.startswith("body.") else name
