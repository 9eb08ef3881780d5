"""t-SNE of penultimate-layer features of clean vs triggered test samples, per attack: the
undefended model beside the focus defense's (``report --focus``; by default the store's).

The features are computed by the cells themselves (``features.safetensors``, written by the
``features`` metric, bench/metrics/features.py, when its ``samples`` is above 0): the report only embeds
and draws them, and never rebuilds a model. It stays cheap because it runs after every
``make bench``: PCA to 50 dimensions first, a short optimisation, one thread.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.reporting.collect import REFERENCE, ReportData, Setup, figure_seed, has_trigger
from bench.reporting.figures import FigureFile, save, style

FEATURES_FILE = "features.safetensors"


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One thread: for a few hundred points it is as fast as several, and OpenMP workers that
    # spin while the machine is busy made it ten times slower (measured on 2 loaded cores).
    with threadpool_limits(limits=1):
        reduced = features
        if features.shape[1] > 50 and features.shape[0] > 50:
            reduced = PCA(n_components=50, random_state=seed).fit_transform(features)
        perplexity = float(min(30, max(5, (len(reduced) - 1) // 4)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed,
                    learning_rate="auto").fit_transform(reduced)


def _stored_features(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _pick(cells, defense: str):
    """The finished cell of a defense to show: its primary (default) variant when there is one."""
    chosen = cells[(cells["defense"] == defense) & (cells["status"] == "done")]
    primary = chosen[chosen["primary"]]
    chosen = primary if len(primary) else chosen
    return chosen.iloc[0] if len(chosen) else None


def render(data: ReportData, setup: Setup, stem: Path, focus: str) -> tuple[FigureFile | None, list[str]]:
    """One row per attack with a trigger, first seed with artifacts: [undefended, focus defense], from the features
    the cells stored. Returns the figure and notes on anything not shown, and why."""
    notes: list[str] = []
    frame = setup.cells
    rows = []
    for attack in setup.attacks:
        if not has_trigger(frame, attack):
            continue
        sub = frame[frame["attack_label"] == attack]
        seed = figure_seed(sub, data.files)
        sub = sub[sub["seed"] == seed]
        panels, labels, triggered, target = [], None, None, None
        for defense in (REFERENCE, focus):
            cell = _pick(sub, defense)
            if cell is None:
                notes.append(f"{attack}: no finished {defense} cell for seed {seed}")
                continue
            path = data.files.directory(cell["id"]) / FEATURES_FILE
            if not path.is_file():
                notes.append(f"{attack}: the {defense} cell {cell['id']} stored no features (it ran before cells stored "
                             "them, or with metric.features.samples=0)")
                continue
            try:
                stored = _stored_features(path)
            except Exception as exc:  # a damaged artifact: say so, the run recomputes it
                notes.append(f"{attack}: {path} is unreadable ({exc.__class__.__name__}: {exc})")
                continue
            is_triggered = stored["triggered"].astype(bool)
            if labels is not None and (len(stored["labels"]) != len(labels) or (stored["labels"] != labels).any()):
                notes.append(f"{attack}: the {defense} cell's samples differ from the undefended cell's; not shown")
                continue
            labels, triggered = stored["labels"], is_triggered
            targets = stored["targets"][is_triggered]
            target = int(targets[0]) if len(targets) and (targets == targets[0]).all() else None
            asr = float((stored["predicted"][is_triggered] == targets).mean() * 100) if len(targets) else None
            display = data.catalog.defense_display(cell["defense"])
            label = display + cell["defense_label"][len(cell["defense"]):]  # a variant keeps its fields
            panels.append((label, embed(stored["features"].astype(np.float32), seed), asr))
        if panels:
            num_classes = int(labels.max()) + 1
            rows.append((attack, seed, panels, labels, triggered, target, num_classes))
    if not rows:
        return None, notes
    samples = int((~rows[0][4]).sum())
    return _draw(rows, stem, samples), notes


def _draw(rows, stem: Path, samples: int) -> FigureFile:
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cols = max(len(panels) for _, _, panels, *_ in rows)
    num_classes = max(r[-1] for r in rows)
    colours = np.array(sns.color_palette("tab10" if num_classes <= 10 else "husl", num_classes))
    with style():
        fig = Figure(figsize=(4.4 * cols + 1.6, 4.0 * len(rows)))
        axes = fig.subplots(len(rows), cols, squeeze=False)
        for (attack, seed, panels, labels, triggered, target, _), row_axes in zip(rows, axes):
            for ax, (label, points, asr) in zip(row_axes, panels):
                clean = ~triggered
                ax.scatter(points[clean, 0], points[clean, 1], s=7, c=colours[labels[clean]], alpha=0.65, linewidths=0)
                # triggered samples in their TRUE class's colour: a backdoored model pulls them away from
                # that class (into the target's region), a cleaned one puts them back beside it
                ax.scatter(points[triggered, 0], points[triggered, 1], s=16, marker="x", c=colours[labels[triggered]],
                           linewidths=0.8, alpha=0.9)
                title = f"{attack} — {label}" + (f" (target class {target})" if target is not None else "")
                if asr is not None and not math.isnan(asr):
                    title += f"\nASR on these samples {asr:.1f}%"
                ax.set_title(title, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in row_axes[len(panels):]:
                ax.set_visible(False)
        handles = [Line2D([], [], marker="o", linestyle="", markersize=5, color="#555555", label="clean"),
                   Line2D([], [], marker="x", linestyle="", color="#555555", label="triggered")]
        handles += [Line2D([], [], marker="s", linestyle="", markersize=6, color=colours[k], label=f"true class {k}")
                    for k in range(min(num_classes, 10))]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        result = save(fig, stem, "t-SNE of penultimate features",
                      f"{samples} clean test samples (dots) and {samples} triggered ones (x), coloured by true class; "
                      "first seed; one embedding per model")
    return result
