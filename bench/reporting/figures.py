"""The report's figures, drawn from the collected frame with seaborn/matplotlib.

Figures are built as ``matplotlib.figure.Figure`` objects (no pyplot): nothing depends on,
or changes, the interactive backend or global rc settings of the caller. Each figure is
written as PNG (for the README) and SVG (for papers). A failed or missing entry is drawn
hatched or marked "—", never left out.
"""
from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from bench.reporting.collect import (
    REFERENCE,
    ItemFiles,
    Setup,
    aggregate,
    figure_seed,
    has_trigger,
    lookup,
    short,
    status_of,
    swept_fields,
)
from bench.reporting.palette import FAILED_EDGE, FAILED_HATCH, defense_markers

STATE_TEXT = {"failed": "failed", "missing": "—", "running": "running"}


@dataclass
class FigureFile:
    title: str
    png: Path
    svg: Path
    caption: str = ""


@contextmanager
def style():
    # a fixed SVG hash salt keeps re-rendered SVGs byte-identical when the results are
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85), \
            matplotlib.rc_context({"svg.hashsalt": "bench-report", "axes.titleweight": "bold"}):
        yield


def save(fig: Figure, stem: Path, title: str, caption: str = "") -> FigureFile:
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"
    fig.savefig(png, dpi=140, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    return FigureFile(title, png, svg, caption)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


# --- heatmaps --------------------------------------------------------------------------

def heatmap(setup: Setup, column: dict, stem: Path) -> FigureFile | None:
    """A defense x attack heatmap of one column, as its metric declared it (bench/metric.py:
    ``Column`` and ``Heatmap``, recorded in the store's catalog)."""
    metric, style_of = column["name"], column["heatmap"]
    label = f"{column['display']} ({column['unit']})" if column.get("unit") else column["display"]
    cmap, vmin, vmax, center, digits = (style_of["colormap"], style_of["vmin"], style_of["vmax"], style_of.get("center"),
                                        style_of.get("digits", 2))
    attacks = [a for a in setup.attacks if not style_of.get("needs_trigger", True) or has_trigger(setup.cells, a)]
    defenses = setup.defenses
    if not attacks or not defenses:
        return None
    table = aggregate(setup.cells, ["defense_label", "attack_label"], (metric,))
    values = np.full((len(defenses), len(attacks)), np.nan)
    text = np.full(values.shape, "", dtype=object)
    states = {}
    for i, defense in enumerate(defenses):
        for j, attack in enumerate(attacks):
            record = lookup(table, defense_label=defense, attack_label=attack)
            status = status_of(record)
            if status in ("done", "partial") and not math.isnan(record[metric]):
                values[i, j] = record[metric]
                text[i, j] = f"{record[metric]:.{digits}f}"
                if not math.isnan(record[f"{metric}_std"]):
                    text[i, j] += f"\n±{record[f'{metric}_std']:.{digits}f}"
                if status == "partial":
                    text[i, j] += "*"
            else:
                states[(i, j)] = STATE_TEXT.get(status, "n/a")
    if vmin is None:  # C-ACC: the colour range starts at the lowest value (in steps of 10) so drops stand out
        low = np.nanmin(values) if np.isfinite(values).any() else 0.0
        vmin = float(max(0.0, min(vmax - 10, 10 * math.floor(low / 10))))
    with style():
        fig = Figure(figsize=(1.6 + 1.25 * len(attacks), 1.2 + 0.55 * len(defenses)))
        ax = fig.subplots()
        mask = np.isnan(values)
        frame = pd.DataFrame(np.where(mask, 0.0, values), index=defenses, columns=attacks)
        with warnings.catch_warnings():  # seaborn 0.13 calls a colormap method matplotlib 3.11 deprecates
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(frame, mask=mask, annot=text, fmt="", cmap=cmap, vmin=vmin, vmax=vmax, center=center,
                        linewidths=0.6, linecolor="white", cbar_kws={"label": label}, ax=ax, annot_kws={"fontsize": 8})
        ax.grid(False)
        for (i, j), state in states.items():
            ax.add_patch(Rectangle((j, i), 1, 1, fill=False, hatch=FAILED_HATCH, edgecolor=FAILED_EDGE, linewidth=0))
            ax.text(j + 0.5, i + 0.5, state, ha="center", va="center", fontsize=8, color="#333333",
                    bbox={"facecolor": "white", "linewidth": 0, "pad": 1.0})
        ax.set_xlabel("attack")
        ax.set_ylabel("defense")
        ax.set_title(f"{label} per defense and attack")
        ax.tick_params(axis="x", rotation=30)
        ax.tick_params(axis="y", rotation=0)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        caption = "mean over seeds (± sample std when several); * some seeds failed; hatched: failed, running or missing"
        result = save(fig, stem, f"{label} heatmap", caption)
    return result


# --- ACC vs ASR ---------------------------------------------------------------------------

def _reference_point(setup: Setup, attack: str) -> tuple[float, float, float, float] | None:
    """The undefended model of each seed's attack stage (the same numbers as the ``undefended`` cells)."""
    stages = setup.cells[setup.cells["attack_label"] == attack].drop_duplicates("stage_id")
    stages = stages[stages["stage_status"] == "done"]
    if stages.empty:
        return None
    asr, acc = stages["undef_asr"], stages["undef_c_acc"]
    return (float(asr.mean()), float(acc.mean()), float(asr.std(ddof=1)) if len(asr) > 1 else 0.0,
            float(acc.std(ddof=1)) if len(acc) > 1 else 0.0)


def scatter(setup: Setup, palette: dict[str, str], stem: Path) -> FigureFile | None:
    attacks = [a for a in setup.attacks if has_trigger(setup.cells, a)]
    if not attacks:
        return None
    primary = setup.primary()
    table = aggregate(primary, ["defense", "attack_label"], ("c_acc", "asr"))
    defenses = [d for d in _defense_names(primary) if d != REFERENCE]
    markers = defense_markers(palette)
    rows, cols = _grid(len(attacks))
    with style():
        fig = Figure(figsize=(3.6 * cols + 1.8, 3.4 * rows))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        lows = [v for v in list(primary["c_acc"].dropna()) + list(primary["undef_c_acc"].dropna())]
        bottom = max(0.0, min(lows, default=90.0) - 5)
        for ax, attack in zip(axes, attacks):
            ax.set_xlim(-4, 104)
            ax.set_ylim(bottom, 101.5)
            ax.scatter([0], [100], marker="*", s=260, color="#f2b701", edgecolor="black", linewidth=0.6, zorder=5)
            ax.annotate("ideal", (0, 100), xytext=(6, -12), textcoords="offset points", fontsize=8)
            reference = _reference_point(setup, attack)
            if reference is not None:
                ax.errorbar(reference[0], reference[1], xerr=reference[2] or None, yerr=reference[3] or None,
                            fmt="X", markersize=10, color=palette[REFERENCE], zorder=4)
            absent = []
            for defense in defenses:
                record = lookup(table, defense=defense, attack_label=attack)
                status = status_of(record)
                if status not in ("done", "partial") or math.isnan(record["asr"]):
                    absent.append(f"{defense}: {STATE_TEXT.get(status, 'n/a')}")
                    continue
                ax.errorbar(record["asr"], record["c_acc"],
                            xerr=None if math.isnan(record["asr_std"]) else record["asr_std"],
                            yerr=None if math.isnan(record["c_acc_std"]) else record["c_acc_std"],
                            fmt=markers.get(defense, "o"), markersize=8, color=palette.get(defense, "#000000"),
                            markeredgecolor="white",
                            zorder=4, alpha=0.95)
            if absent:
                ax.text(0.98, 0.03, "\n".join(absent), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                        bbox={"facecolor": "white", "edgecolor": "#bbbbbb", "alpha": 0.9})
            ax.set_title(attack)
            ax.set_xlabel("ASR (%)")
            ax.set_ylabel("C-ACC (%)")
        for ax in axes[len(attacks):]:
            ax.set_visible(False)
        handles = [Line2D([], [], marker="X", linestyle="", markersize=9, color=palette[REFERENCE], label="undefended")]
        handles += [Line2D([], [], marker=markers.get(d, "o"), linestyle="", markersize=8, color=palette.get(d, "#000000"),
                           label=d)
                    for d in defenses]
        handles.append(Line2D([], [], marker="*", linestyle="", markersize=13, color="#f2b701", label="ideal"))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.suptitle("Clean accuracy vs attack success, per attack", fontweight="bold")
        fig.tight_layout()
        result = save(fig, stem, "C-ACC vs ASR",
                      "top-left is ideal; error bars: std over seeds; failed or missing defenses listed in each panel")
    return result


def _defense_names(frame: pd.DataFrame) -> list[str]:
    names = sorted(frame["defense"].unique())
    return ([REFERENCE] if REFERENCE in names else []) + [n for n in names if n != REFERENCE]


# --- grouped bars ----------------------------------------------------------------------

def bars(setup: Setup, palette: dict[str, str], stem: Path) -> FigureFile | None:
    primary = setup.primary()
    attacks = setup.attacks
    defenses = _defense_names(primary)
    if not attacks or not defenses:
        return None
    table = aggregate(primary, ["defense", "attack_label"], ("c_acc", "asr"))
    width = 0.8 / len(defenses)
    with style():
        fig = Figure(figsize=(max(6.0, 1.1 * len(attacks) * max(1, len(defenses)) * 0.45 + 2.5), 6.4))
        axes = fig.subplots(2, 1, sharex=True)
        for ax, metric, label in zip(axes, ("c_acc", "asr"), ("C-ACC (%)", "ASR (%)")):
            for j, attack in enumerate(attacks):
                triggered = metric == "c_acc" or has_trigger(setup.cells, attack)
                if not triggered:
                    ax.text(j, 3, "no trigger", ha="center", va="bottom", fontsize=8, color="#555555")
                    continue
                for i, defense in enumerate(defenses):
                    x = j - 0.4 + width * (i + 0.5)
                    colour = palette.get(defense, "#000000")
                    record = lookup(table, defense=defense, attack_label=attack)
                    status = status_of(record)
                    if status in ("done", "partial") and not math.isnan(record[metric]):
                        std = record[f"{metric}_std"]
                        ax.bar(x, record[metric], width=width * 0.95, color=colour,
                               yerr=None if math.isnan(std) else std, capsize=2, error_kw={"linewidth": 0.8})
                    elif status == "missing":
                        ax.text(x, 2, "—", ha="center", va="bottom", fontsize=9, color=colour)
                    else:
                        # a pale hatched column over the whole axis reads as "no value here", not as 100 %
                        ax.bar(x, 105, width=width * 0.95, fill=False, hatch=FAILED_HATCH, edgecolor=FAILED_EDGE,
                               linewidth=0)
                        ax.text(x, 52, STATE_TEXT.get(status, "n/a"), rotation=90, ha="center", va="center",
                                fontsize=8, fontweight="bold", color=colour,
                                bbox={"facecolor": "white", "linewidth": 0, "pad": 1.0})
            ax.set_ylim(0, 105)
            ax.set_ylabel(label)
            ax.grid(axis="x", visible=False)
        axes[1].set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        axes[0].set_title("C-ACC and ASR per attack (mean over seeds, error bars: std)")
        handles = [Patch(color=palette.get(d, "#000000"), label=d) for d in defenses]
        handles.append(Patch(facecolor="white", edgecolor=FAILED_EDGE, hatch=FAILED_HATCH, label="failed / running"))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        result = save(fig, stem, "C-ACC and ASR per attack", "hatched bars: failed or unfinished cells; —: not run")
    return result


# --- training curves ---------------------------------------------------------------------

def read_history(directory: Path) -> list[dict]:
    try:
        with open(directory / "history.json") as handle:
            history = json.load(handle)
        return history if isinstance(history, list) else []
    except (OSError, ValueError):
        return []


def _curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for position, record in enumerate(history, start=1):
        value = record.get(key) if isinstance(record, dict) else None
        if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(position)
            ys.append(float(value))
    return xs, ys


def curves(setup: Setup, palette: dict[str, str], files: ItemFiles, stem: Path) -> tuple[FigureFile | None, list[str]]:
    """Per attack (first seed with files): the attack stage's test C-ACC/ASR per epoch, and each defense's
    training or fine-tuning curves, from the cells' history.json (artifact directory, or kept by an export)."""
    primary = setup.primary()
    notes: list[str] = []
    panels = []
    for attack in setup.attacks:
        sub = primary[(primary["attack_label"] == attack) & (primary["stage_status"] == "done")]
        if sub.empty:
            continue
        seed = figure_seed(sub, files)
        sub = sub[sub["seed"] == seed]
        stage = read_history(files.directory(sub.iloc[0]["stage_id"]))
        lines = []
        for _, cell in sub[(sub["status"] == "done") & (sub["defense"] != REFERENCE)].iterrows():
            history = read_history(files.directory(cell["id"]))
            if _curve(history, "test_c_acc")[0]:
                lines.append((cell["defense"], history))
        if _curve(stage, "test_c_acc")[0] or lines:
            panels.append((attack, seed, stage, lines))
    if not panels:
        notes.append("no per-epoch test curves were recorded (profile with curve_samples=0, or no artifacts)")
        return None, notes
    any_defense = any(lines for *_, lines in panels)
    if not any_defense:
        notes.append("no defense recorded per-epoch test curves; only the attack stages are plotted")
    with style():
        fig = Figure(figsize=(10.5 if any_defense else 5.6, 2.9 * len(panels) + 0.6))
        axes = fig.subplots(len(panels), 2 if any_defense else 1, squeeze=False)
        seen = set()
        for (attack, seed, stage, lines), row_axes in zip(panels, axes):
            for ax in row_axes:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            left = row_axes[0]
            for key, dash in (("test_c_acc", "-"), ("test_asr", "--")):
                xs, ys = _curve(stage, key)
                if xs:
                    left.plot(xs, ys, dash, color=palette[REFERENCE], marker="." if len(xs) < 30 else None)
            left.set_title(f"{attack} — attack stage (seed {seed})")
            for ax in row_axes:
                ax.set_ylim(-3, 103)
                ax.set_xlabel("epoch")
                ax.set_ylabel("%")
            if not any_defense:
                continue
            right = row_axes[1]
            for defense, history in lines:
                seen.add(defense)
                for key, dash in (("test_c_acc", "-"), ("test_asr", "--")):
                    xs, ys = _curve(history, key)
                    if xs:
                        right.plot(xs, ys, dash, color=palette.get(defense, "#000000"), marker="." if len(xs) < 30 else None)
            right.set_title(f"{attack} — defenses (seed {seed})")
            if not lines:
                right.text(0.5, 0.5, "no defense recorded per-epoch curves", transform=right.transAxes, ha="center",
                           fontsize=8, color="#555555")
        handles = [Line2D([], [], color="#333333", linestyle="-", label="C-ACC"),
                   Line2D([], [], color="#333333", linestyle="--", label="ASR"),
                   Line2D([], [], color=palette[REFERENCE], label="attack stage")]
        handles += [Line2D([], [], color=palette.get(d, "#000000"), label=d) for d in sorted(seen)]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        result = save(fig, stem, "Training curves",
                      f"test C-ACC (solid) and ASR (dashed) per epoch on {setup.cells.iloc[0]['model']}; "
                      "defense epochs count from the start of the defense's own training or fine-tuning")
    return result, notes


# --- sweeps ---------------------------------------------------------------------------------

def sweeps(setup: Setup, palette: dict[str, str], directory: Path, prefix: str = "") -> list[FigureFile]:
    """For every defense the setup holds with several configurations: C-ACC and ASR against each
    swept field, one line per attack (and per combination of the other swept fields)."""
    results = []
    frame = setup.cells
    for defense in sorted(frame["defense"].unique()):
        sub = frame[frame["defense"] == defense]
        fields = swept_fields(frame, defense)
        for swept in fields:
            others = [f for f in fields if f != swept]
            sub = sub.assign(
                x=[c.get(swept) for c in sub["defense_config"]],
                group=[a + "".join(f", {o}={short(c.get(o))}" for o in others)
                       for a, c in zip(sub["attack_label"], sub["defense_config"])])
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sub["x"])
            sub = sub.assign(x=sub["x"].map(lambda v: v if numeric else short(v)))
            table = aggregate(sub, ["group", "x"], ("c_acc", "asr"))
            results.append(_sweep_figure(defense, swept, table, numeric, palette,
                                         directory / f"{prefix}sweep_{_slug(defense)}_{_slug(swept)}"))
    return results


def _sweep_figure(defense: str, swept: str, table: pd.DataFrame, numeric: bool, palette: dict[str, str],
                  stem: Path) -> FigureFile:
    groups = sorted(table["group"].unique())
    colours = dict(zip(groups, sns.color_palette("deep", len(groups)).as_hex()))
    xs_all = sorted(table["x"].unique(), key=lambda v: (v if numeric else str(v)))
    position = {x: (x if numeric else i) for i, x in enumerate(xs_all)}
    with style():
        fig = Figure(figsize=(10, 3.8))
        axes = fig.subplots(1, 2)
        failed_shown = False
        for ax, metric, label in zip(axes, ("c_acc", "asr"), ("C-ACC (%)", "ASR (%)")):
            for group in groups:
                rows = table[table["group"] == group].copy()
                rows["pos"] = rows["x"].map(position)
                rows = rows.sort_values("pos")
                ok = rows[rows[metric].notna()]
                if len(ok):
                    ax.errorbar(ok["pos"], ok[metric], yerr=ok[f"{metric}_std"].fillna(0), marker="o", capsize=3,
                                color=colours[group], label=group)
                bad = rows[rows[metric].isna() & (rows["n_done"] < rows["n"])]
                if len(bad):
                    failed_shown = True
                    ax.scatter(bad["pos"], [-1.5] * len(bad), marker="x", s=60, color=colours[group], clip_on=False)
            ax.set_ylim(-4, 104)
            ax.set_xlabel(swept)
            ax.set_ylabel(label)
            if numeric:
                values = [v for v in xs_all if v > 0]
                if len(values) == len(xs_all) and len(values) > 2 and max(values) / min(values) >= 20:
                    ax.set_xscale("log")
                ax.set_xticks(xs_all, [short(v) for v in xs_all])
            else:
                ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
        handles, labels = axes[0].get_legend_handles_labels()
        if failed_shown:
            handles.append(Line2D([], [], marker="x", linestyle="", color="#333333"))
            labels.append("failed (no value)")
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="attack")
        fig.suptitle(f"{defense}: sensitivity to {swept}", fontweight="bold", color=palette.get(defense, "#000000"))
        fig.tight_layout()
        result = save(fig, stem, f"{defense}: sensitivity to {swept}",
                      "mean over seeds, error bars: std; x at the bottom: every cell of that value failed")
    return result


def _slug(text: str) -> str:
    import re

    return re.sub(r"-+", "-", "".join(c if c.isalnum() or c in "-_" else "-" for c in text)).strip("-")


# --- cross-dataset ------------------------------------------------------------------------------

def summary(table: pd.DataFrame, palette: dict[str, str], stem: Path) -> FigureFile | None:
    """Per defense: mean C-ACC and ASR over datasets (bars), each dataset's value as a dot."""
    if table.empty:
        return None
    defenses = _defense_names(table)
    datasets = sorted(table["dataset"].unique())
    markers = dict(zip(datasets, "oDs^vP*Xh<>"))
    with style():
        fig = Figure(figsize=(max(6.0, 0.9 * len(defenses) + 3), 6.2))
        axes = fig.subplots(2, 1, sharex=True)
        for ax, metric, label in zip(axes, ("c_acc", "asr"), ("mean C-ACC (%)", "mean ASR (%)")):
            for i, defense in enumerate(defenses):
                rows = table[(table["defense"] == defense)]
                values = rows[metric].dropna()
                colour = palette.get(defense, "#000000")
                if len(values):
                    ax.bar(i, values.mean(), width=0.7, color=colour, alpha=0.85)
                else:
                    ax.bar(i, 105, width=0.7, fill=False, hatch=FAILED_HATCH, edgecolor=FAILED_EDGE, linewidth=0)
                    ax.text(i, 50, "no result", rotation=90, ha="center", va="center", fontsize=7)
                for _, row in rows.iterrows():
                    if not math.isnan(row[metric]):
                        ax.scatter(i, row[metric], marker=markers.get(row["dataset"], "o"), color="black", s=18, zorder=3)
            ax.set_ylim(0, 105)
            ax.set_ylabel(label)
            ax.grid(axis="x", visible=False)
        axes[1].set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
        axes[0].set_title("Across datasets: bars = mean over datasets, markers = each dataset")
        handles = [Line2D([], [], marker=markers[d], linestyle="", color="black", label=d) for d in datasets]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="dataset")
        fig.tight_layout()
        result = save(fig, stem, "Cross-dataset summary", "hatched: no finished cell of that defense")
    return result
