"""t-SNE of penultimate-layer features of clean vs triggered test samples, per attack:
the undefended model beside NONE's (when the store holds a finished NONE cell).

Models and data are rebuilt from the artifact directories the store points to. It stays
cheap because it runs after every ``make bench``: a few hundred samples per model, PCA to
50 dimensions first, a short optimisation, and a thread cap so it does not fight the
machine's other work.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from bench.data.base import to_unit
from bench.report.collect import ReportData, Setup, has_trigger
from bench.report.figures import FigureFile, save, style

NONE_DEFENSE = "none"


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        batch = to_unit(batch)
        out.append(model.features(batch).flatten(1).float().cpu())
    return torch.cat(out).numpy()


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


def _stage_spec(stage: dict):
    from bench.cell import StageSpec

    names = {f.name for f in dataclasses.fields(StageSpec)}
    return StageSpec(**{k: v for k, v in (stage.get("config") or {}).items() if k in names})


def render(data: ReportData, setup: Setup, stem: Path, samples: int = 300, device: str = "auto"
           ) -> tuple[FigureFile | None, list[str]]:
    """One row per attack with a trigger: [undefended, NONE]. Returns the figure and notes on
    anything skipped (fabricated cells without artifacts, stale plugin versions, ...)."""
    from safetensors.torch import load_model

    from bench.cell import Workspace
    from bench.device import resolve_device
    from bench.engine import predict
    from bench.models.base import build_model

    notes: list[str] = []
    frame = setup.cells
    jobs = []
    for attack in setup.attacks:
        if not has_trigger(frame, attack):
            continue
        sub = frame[(frame["attack_label"] == attack) & (frame["stage_status"] == "done")]
        if sub.empty:
            notes.append(f"{attack}: the attack stage has not finished")
            continue
        seed = int(sub["seed"].min())
        sub = sub[sub["seed"] == seed]
        stage_id = sub.iloc[0]["stage_id"]
        none_cells = sub[(sub["defense"] == NONE_DEFENSE) & (sub["status"] == "done")]
        none_primary = none_cells[none_cells["primary"]]
        none_cell = (none_primary if len(none_primary) else none_cells).head(1)
        jobs.append((attack, seed, stage_id, none_cell.iloc[0] if len(none_cell) else None))
    if not jobs:
        return None, notes
    ws = Workspace(data.artifacts_root, resolve_device(device))
    rows = []
    for attack, seed, stage_id, none_cell in jobs:
        stage_dir = data.artifacts_root / stage_id
        if not (stage_dir / "model.safetensors").is_file():
            notes.append(f"{attack}: no model in {stage_dir} (artifacts deleted, or cells not produced by a run)")
            continue
        try:
            spec = _stage_spec(data.stages[stage_id])
            if spec.id != stage_id:
                notes.append(f"{attack}: stage {stage_id} was produced by another version of the attack or core; "
                             "its model is not rebuilt")
                continue
            model, attack_obj, _ = ws.load_stage(spec)
            info, _, _, test = ws.split(spec)
            x_trig, y_true, y_target = ws.triggered(spec, attack_obj, test)
        except Exception as exc:  # a report must not fail on one unreadable artifact: say so instead
            notes.append(f"{attack}: could not rebuild the stage ({exc.__class__.__name__}: {exc})")
            continue
        generator = torch.Generator().manual_seed(seed)
        clean_idx = torch.randperm(len(test), generator=generator)[:samples].to(test.x.device)
        trig_idx = torch.randperm(len(x_trig), generator=generator)[:samples].to(x_trig.device)
        x = torch.cat([test.x[clean_idx], x_trig[trig_idx]])
        labels = torch.cat([test.y[clean_idx], y_true[trig_idx]]).cpu().numpy()
        triggered = np.r_[np.zeros(len(clean_idx), bool), np.ones(len(trig_idx), bool)]
        target = int(y_target[0]) if len(y_target) and bool((y_target == y_target[0]).all()) else None
        models = [("undefended", model)]
        if none_cell is None:
            notes.append(f"{attack}: no finished NONE cell, only the undefended model is shown")
        else:
            path = data.artifacts_root / none_cell["id"] / "model.safetensors"
            defended = model
            if path.is_file():
                defended = build_model(spec.model, info).to(ws.device)
                load_model(defended, str(path), device=str(ws.device))
            label = "NONE" if none_cell["defense_label"] == NONE_DEFENSE else none_cell["defense_label"]
            models.append((label, defended.eval()))
        panels = []
        for label, net in models:
            points = embed(_features(net, x), seed)
            predicted = predict(net, x[len(clean_idx):]).cpu().numpy()
            asr = float((predicted == y_target[trig_idx].cpu().numpy()).mean() * 100) if len(predicted) else None
            panels.append((label, points, asr))
        rows.append((attack, seed, panels, labels, triggered, target, info.num_classes))
    if not rows:
        return None, notes
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
