"""The report's "did the defense hit the backdoor's units?" section, from the selection metrics
that cells of unit-selecting defenses store (bench/metrics/selection.py computes them).

For each defense that declares the units it ablates (NONE, Fine-Pruning, ANP, CLP, or a plugin)
and each attack: the undefended ASR, the ASR with the defense's own selection ablated and nothing
else (``sel_asr``), the ASR with as many units per layer chosen by an oracle that measured each
unit's own effect on ASR (``oracle_asr``), the chance baseline (``rand_asr``: as many units per
layer drawn at random, mean and [min–max] over the draws and seeds), the share of the oracle's
units the defense picked (``sel_recall``), the clean accuracy under the selection and under the
random draws, and the ASR after the whole defense (fine-tuning included). A ``sel_asr`` far above
``oracle_asr`` says the units that carry the backdoor were there to be found and the defense's
criterion did not find them; both high says no small set of units carries it; ``sel_asr`` no
lower than ``rand_asr`` says the selection did no better than any ablation of its size.
"""
from __future__ import annotations

import math
from pathlib import Path

from bench.reporting.collect import (
    Setup,
    aggregate,
    has_trigger,
    lookup,
    status_of,
)
from bench.reporting.figures import FigureFile, save, style
from bench.reporting.palette import defense_markers
from bench.reporting.tables import DASH, fmt_stat, markdown_table

# bench/metrics/selection.py's columns
SELECTION = ("sel_asr", "oracle_asr", "rand_asr", "sel_recall", "sel_acc", "rand_acc")


def _selecting(setup: Setup) -> list[str]:
    """Every variant (a sweep's too: the site or reset fraction is what a study varies) that stored
    selection metrics."""
    frame = setup.cells
    return [d for d in setup.defenses if frame.loc[frame["defense_label"] == d, "sel_asr"].notna().any()]


def table(setup: Setup) -> str | None:
    defenses = _selecting(setup)
    if not defenses:
        return None
    frame = setup.cells
    stats = aggregate(frame, ["defense_label", "attack_label"], SELECTION + ("asr", "undef_asr"))
    rows = []
    for defense in defenses:
        for attack in setup.attacks:
            if not has_trigger(frame, attack):
                continue
            record = lookup(stats, defense_label=defense, attack_label=attack)
            if status_of(record) not in ("done", "partial") or math.isnan(record["sel_asr"]):
                continue
            rows.append([defense, attack, fmt_stat(record, "undef_asr"), fmt_stat(record, "sel_asr"),
                         fmt_stat(record, "oracle_asr"), _with_range(record, frame, defense, attack, "rand_asr"),
                         fmt_stat(record, "sel_recall"), fmt_stat(record, "sel_acc"),
                         _with_range(record, frame, defense, attack, "rand_acc"), _units(frame, defense, attack),
                         fmt_stat(record, "asr")])
    if not rows:
        return None
    return markdown_table(["defense", "attack", "undefended ASR", "selection ASR", "oracle ASR", "random ASR [min–max]",
                           "recall %", "selection C-ACC", "random C-ACC [min–max]", "units (first seed)",
                           "ASR after the defense"], rows, ["l", "l"] + ["r"] * 9)


def random_range(frame, defense: str, attack: str, name: str) -> tuple[float, float] | None:
    """The lowest and highest value of one chance-baseline column over every draw of every seed."""
    cells = frame[(frame["defense_label"] == defense) & (frame["attack_label"] == attack) & (frame["status"] == "done")]
    ranges = [((measured or {}).get("selection") or {}).get(f"{name}_range") for measured in cells["measured"]]
    ranges = [r for r in ranges if r]
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None


def _with_range(record, frame, defense: str, attack: str, name: str) -> str:
    text = fmt_stat(record, name)
    bounds = random_range(frame, defense, attack, name)
    return text if bounds is None or text == DASH else f"{text} [{bounds[0]:.2f}–{bounds[1]:.2f}]"


def _units(frame, defense: str, attack: str) -> str:
    """How many units the defense ablated (first seed), e.g. ``12 in 3 layers``."""
    cells = frame[(frame["defense_label"] == defense) & (frame["attack_label"] == attack) & (frame["status"] == "done")]
    for measured in cells.sort_values("seed")["measured"]:
        layers = ((measured or {}).get("selection") or {}).get("layers") or {}
        if layers:
            count = sum(len(layer.get("selected") or []) for layer in layers.values())
            used = sum(1 for layer in layers.values() if layer.get("selected"))
            return f"{count} in {used} layer{'s' if used != 1 else ''}"
    return DASH


def _variant_fields(defense: str, labels) -> tuple[list[str], dict[str, list[str]]]:
    """The swept fields in a defense's variant labels (``none (a=1, b=2)``) and each label's values."""
    parsed = {label: dict(part.strip().split("=", 1) for part in label[len(defense):].strip(" ()").split(",")
                          if "=" in part) for label in labels}
    fields = sorted({key for values in parsed.values() for key in values})
    return fields, {label: [values.get(key, "?") for key in fields] for label, values in parsed.items()}


def _point_labels(defense: str, group, x: str) -> dict[tuple[float, float], str]:
    """One label per drawn position (``x`` against selection ASR): the attack and, for a sweep, the
    variant's values (in the field order the caption gives), one line per variant where points coincide."""
    _, values = _variant_fields(defense, group["defense_label"].unique())
    labels: dict[tuple[float, float], list[str]] = {}
    for _, row in group.iterrows():
        own = values[row["defense_label"]]
        text = row["attack_label"] + (f" {'/'.join(own)}" if own else "")
        labels.setdefault((round(row[x], 1), round(row["sel_asr"], 1)), []).append(text)
    return {position: "\n".join(texts) for position, texts in labels.items()}


PANELS = (("oracle_asr", "oracle ASR (%): as many units, chosen by their own effect", "against the oracle"),
          ("rand_asr", "random ASR (%): as many units, drawn at random", "against chance"))


def figure(setup: Setup, palette: dict[str, str], stem: Path) -> FigureFile | None:
    """Selection ASR against oracle ASR (left) and against the chance baseline (right, with the
    draws' min–max), one point per (defense, attack): on the diagonal the defense picked as well as
    the oracle, or as chance; above it, worse."""
    defenses = _selecting(setup)
    if not defenses:
        return None
    frame = setup.cells
    stats = aggregate(frame, ["defense", "defense_label", "attack_label"], SELECTION)
    stats = stats[stats["sel_asr"].notna() & stats["oracle_asr"].notna()]
    if stats.empty:
        return None
    markers = defense_markers(palette)
    panels = [panel for panel in PANELS if stats[panel[0]].notna().any()]
    with style():
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.0 * len(panels) + 1.4, 5.0))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (x, label, title) in zip(axes, panels):
            ax.plot([0, 100], [0, 100], color="#999999", linestyle="--", linewidth=1, zorder=1)
            for defense, group in stats.groupby("defense", sort=True):
                group = group[group[x].notna()]
                if x == "rand_asr":  # the draws' spread, as a horizontal bar through the point
                    for _, row in group.iterrows():
                        span = random_range(frame, row["defense_label"], row["attack_label"], x)
                        if span:
                            ax.hlines(row["sel_asr"], span[0], span[1], color=palette.get(defense, "#000000"),
                                      linewidth=0.8, alpha=0.6, zorder=2)
                ax.scatter(group[x], group["sel_asr"], s=60, marker=markers.get(defense, "o"),
                           color=palette.get(defense, "#000000"), edgecolor="white", label=defense, zorder=3)
                for (px, py), text in _point_labels(defense, group, x).items():
                    ax.annotate(text, (px, py), xytext=(4, 3), textcoords="offset points", fontsize=6, color="#333333",
                                va="top" if "\n" in text else "bottom")
            ax.set_xlim(-4, 104)
            ax.set_ylim(-4, 104)
            ax.set_xlabel(label)
            ax.set_ylabel("selection ASR (%): the defense's units")
            ax.set_aspect("equal")
            ax.set_title(f"Selection {title}", fontweight="bold")
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        means = round(float(stats["sel_recall"].dropna().mean()), 1) if stats["sel_recall"].notna().any() else None
        sweeps = [f"{defense}: {'/'.join(fields)}" for defense, group in stats.groupby("defense", sort=True)
                  if (fields := _variant_fields(defense, group["defense_label"].unique())[0])]
        caption = ("each point a (defense variant, attack), mean over seeds, undefended model, before fine-tuning; above the "
                   "diagonal the defense's choice removes less of the backdoor than the oracle's (left) or than as many "
                   "units drawn at random (right; bars: min–max over the draws and seeds)"
                   + (f"; labels give a sweep's values in the order {'; '.join(sweeps)}" if sweeps else "")
                   + (f"; mean recall of the oracle's units {means}%" if means is not None else ""))
        return save(fig, stem, "Selection vs oracle and chance", caption)
