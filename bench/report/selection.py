"""The report's "did the defense hit the backdoor's units?" section, from the selection metrics
that cells of unit-selecting defenses store (bench/metrics/selection.py computes them).

For each defense that declares the units it ablates (NONE, Fine-Pruning, ANP, CLP, or a plugin)
and each attack: the undefended ASR, the ASR with the defense's own selection ablated and nothing
else (``sel_asr``), the ASR with as many units per layer chosen by an oracle that measured each
unit's own effect on ASR (``oracle_asr``), the share of the oracle's units the defense picked
(``sel_recall``) and the ASR after the whole defense (fine-tuning included). A ``sel_asr`` far
above ``oracle_asr`` says the units that carry the backdoor were there to be found and the
defense's criterion did not find them; both high says no small set of units carries it.
"""
from __future__ import annotations

import math
from pathlib import Path

from bench.report.collect import (
    SELECTION_METRICS,
    Setup,
    aggregate,
    has_trigger,
    lookup,
    status_of,
)
from bench.report.figures import FigureFile, save, style
from bench.report.palette import defense_markers
from bench.report.tables import DASH, fmt_stat, markdown_table

EXPLANATION = (
    "For defenses that reset or prune units: the ASR of the *undefended* model with the defense's own selection "
    "ablated and nothing else (**selection ASR**), with as many units per layer chosen by an oracle that measured "
    "each unit's own effect on ASR (**oracle ASR**), and the share of the oracle's units the defense picked "
    "(**recall**), all before any fine-tuning; then the ASR after the whole defense. The oracle uses the triggered "
    "test set, which the defense never sees. Selection ASR far above oracle ASR: the backdoor's units were there to "
    "be found and the defense's criterion missed them; both high: no set of that size carries the backdoor.")


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
    stats = aggregate(frame, ["defense_label", "attack_label"], SELECTION_METRICS + ("asr", "undef_asr"))
    rows = []
    for defense in defenses:
        for attack in setup.attacks:
            if not has_trigger(frame, attack):
                continue
            record = lookup(stats, defense_label=defense, attack_label=attack)
            if status_of(record) not in ("done", "partial") or math.isnan(record["sel_asr"]):
                continue
            rows.append([defense, attack, fmt_stat(record, "undef_asr"), fmt_stat(record, "sel_asr"),
                         fmt_stat(record, "oracle_asr"), fmt_stat(record, "sel_recall"), _units(frame, defense, attack),
                         fmt_stat(record, "asr")])
    if not rows:
        return None
    return markdown_table(["defense", "attack", "undefended ASR", "selection ASR", "oracle ASR", "recall %", "units (first seed)",
                           "ASR after the defense"], rows, ["l", "l"] + ["r"] * 6)


def _units(frame, defense: str, attack: str) -> str:
    """How many units the defense ablated (first seed), e.g. ``12 in 3 layers``."""
    cells = frame[(frame["defense_label"] == defense) & (frame["attack_label"] == attack) & (frame["status"] == "done")]
    for details in cells.sort_values("seed")["details"]:
        layers = ((details or {}).get("selection") or {}).get("layers") or {}
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


def _point_labels(defense: str, group) -> dict[tuple[float, float], str]:
    """One label per drawn position: the attack and, for a sweep, the variant's values (in the
    field order the caption gives), one line per variant where points coincide."""
    _, values = _variant_fields(defense, group["defense_label"].unique())
    labels: dict[tuple[float, float], list[str]] = {}
    for _, row in group.iterrows():
        own = values[row["defense_label"]]
        text = row["attack_label"] + (f" {'/'.join(own)}" if own else "")
        labels.setdefault((round(row["oracle_asr"], 1), round(row["sel_asr"], 1)), []).append(text)
    return {position: "\n".join(texts) for position, texts in labels.items()}


def figure(setup: Setup, palette: dict[str, str], stem: Path) -> FigureFile | None:
    """Selection ASR against oracle ASR, one point per (defense, attack): on the diagonal the
    defense picked as well as the oracle; above it, worse."""
    defenses = _selecting(setup)
    if not defenses:
        return None
    stats = aggregate(setup.cells, ["defense", "defense_label", "attack_label"], SELECTION_METRICS)
    stats = stats[stats["sel_asr"].notna() & stats["oracle_asr"].notna()]
    if stats.empty:
        return None
    markers = defense_markers(list(palette))
    with style():
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.2, 5.0))
        ax = fig.subplots()
        ax.plot([0, 100], [0, 100], color="#999999", linestyle="--", linewidth=1, zorder=1)
        for defense, group in stats.groupby("defense", sort=True):
            ax.scatter(group["oracle_asr"], group["sel_asr"], s=60, marker=markers.get(defense, "o"),
                       color=palette.get(defense, "#000000"), edgecolor="white", label=defense, zorder=3)
            for (x, y), text in _point_labels(defense, group).items():
                ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6, color="#333333",
                            va="top" if "\n" in text else "bottom")
        ax.set_xlim(-4, 104)
        ax.set_ylim(-4, 104)
        ax.set_xlabel("oracle ASR (%): as many units, chosen by their own effect")
        ax.set_ylabel("selection ASR (%): the defense's units")
        ax.set_aspect("equal")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_title("Did the defense hit the backdoor's units?", fontweight="bold")
        fig.tight_layout()
        means = round(float(stats["sel_recall"].dropna().mean()), 1) if stats["sel_recall"].notna().any() else None
        sweeps = [f"{defense}: {'/'.join(fields)}" for defense, group in stats.groupby("defense", sort=True)
                  if (fields := _variant_fields(defense, group["defense_label"].unique())[0])]
        caption = ("each point a (defense variant, attack), mean over seeds, undefended model, before fine-tuning; above the "
                   "diagonal the defense's choice removes less of the backdoor than the oracle's"
                   + (f"; labels give a sweep's values in the order {'; '.join(sweeps)}" if sweeps else "")
                   + (f"; mean recall of the oracle's units {means}%" if means is not None else ""))
        return save(fig, stem, "Selection vs oracle ASR", caption)
