"""Figures of the trigger-inversion scan: REASR against the size bound, and the reversed triggers."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.scan import ScanResult  # noqa: E402


def plot_reasr(curves: Mapping[str, Mapping[float, float]], path: Path, title: str = "") -> Path:
    """One line per model (e.g. per defense): REASR (%) against the mask bound (% of the image area)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        bounds = sorted(float(b) for b in curve)
        values = [curve[b] if b in curve else curve[f"{b:g}"] for b in bounds]  # type: ignore[index]
        ax.plot([100 * b for b in bounds], values, marker="o", label=name)
    ax.set_xlabel("trigger size bound (% of image area)")
    ax.set_ylabel("REASR (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _preview(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The trigger as it would look stamped on a mid-grey image, HxWxC for imshow."""
    image = (1 - mask) * 0.5 + mask * pattern
    image = image.clamp(0, 1).permute(1, 2, 0)
    return image.squeeze(-1) if image.shape[-1] == 1 else image


def trigger_grid(results: Mapping[str, ScanResult], path: Path, title: str = "") -> Path:
    """Rows: models (e.g. defenses); columns: bounds. Each cell shows the best candidate's
    reversed trigger stamped on grey, titled with its label and REASR."""
    names = list(results)
    bounds = sorted({b for r in results.values() for b in r.bounds})
    fig, axes = plt.subplots(len(names), len(bounds), figsize=(1.6 * len(bounds) + 1, 1.8 * len(names) + 0.4),
                             squeeze=False)
    for row, name in enumerate(names):
        result = results[name]
        for col, bound in enumerate(bounds):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if bound in result.bounds:
                i = result.bounds.index(bound)
                image = _preview(result.masks[i].float(), result.patterns[i].float())
                ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None, vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_title(f"{100 * bound:g}%: y={result.best_label[bound]} {result.reasr[bound]:.0f}%", fontsize=7)
            else:
                ax.axis("off")
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
