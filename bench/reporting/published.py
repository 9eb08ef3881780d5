"""Fidelity to published results (docs/protocol.md, "Fidelity to published results"): how many of a
reference's outcomes each setup reproduces in direction, with its seed spread and cost.

A reference is a JSON file (docs/reference/backdoorbench-cifar10.json): a name, a setting and a list
of outcomes, each an (attack, defense) with the published ASR (and C-ACC where given). Each ASR
falls in a class (removed < 25% <= partial < 75% <= kept); a setup reproduces an outcome when its
mean ASR over seeds (the defense's default variant; the attack stage's own model for
``undefended``) falls in the same class. Outcomes a setup did not run are counted apart, never as
failures.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.reporting.catalog import REFERENCE
from bench.reporting.collect import ReportData, Setup
from bench.reporting.tables import DASH, markdown_table

CLASSES = (("removed", 25.0), ("partial", 75.0), ("kept", math.inf))  # (name, upper bound, exclusive)


def asr_class(asr: float) -> str:
    return next(name for name, upper in CLASSES if asr < upper)


@dataclass
class Reference:
    name: str
    setting: str
    outcomes: list[dict]
    path: Path

    @staticmethod
    def load(path: str | Path) -> "Reference":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            outcomes = [dict(o, asr=float(o["asr"])) for o in data["outcomes"]]
            if any(not isinstance(o.get("attack"), str) or not isinstance(o.get("defense"), str) for o in outcomes):
                raise ValueError("every outcome needs an attack and a defense")
            return Reference(str(data["name"]), str(data.get("setting", "")), outcomes, path)
        except FileNotFoundError:
            raise BenchError(f"no reference file at {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{path} is not a reference of published outcomes ({exc.__class__.__name__}: {exc}); "
                             "expected {\"name\", \"setting\", \"outcomes\": [{\"attack\", \"defense\", \"asr\"}, ...]}") from None


@dataclass
class Outcome:
    """One published outcome against one setup's cells."""

    attack: str
    defense: str
    published: float
    asrs: list[float] = field(default_factory=list)   # the setup's ASR, one per finished seed
    c_acc_drop: float | None = None                    # mean undefended minus defended C-ACC, points

    @property
    def expected(self) -> str:
        return asr_class(self.published)

    @property
    def mean(self) -> float | None:
        return sum(self.asrs) / len(self.asrs) if self.asrs else None

    @property
    def std(self) -> float | None:
        return float(pd.Series(self.asrs).std(ddof=1)) if len(self.asrs) > 1 else None

    @property
    def found(self) -> str | None:
        return None if self.mean is None else asr_class(self.mean)

    @property
    def reproduced(self) -> bool | None:
        return None if self.found is None else self.found == self.expected


def outcomes(reference: Reference, setup: Setup) -> list[Outcome]:
    frame = setup.cells
    done = frame[frame["status"] == "done"]
    result = []
    for item in reference.outcomes:
        outcome = Outcome(item["attack"], item["defense"], item["asr"])
        row = done[done["attack"] == item["attack"]]
        if item["defense"] == REFERENCE:  # the attack stage's own model, one per seed
            stages = row.drop_duplicates("stage_id")
            outcome.asrs = [float(v) for v in stages["undef_asr"].dropna()]
        else:
            cells = row[(row["defense"] == item["defense"]) & row["primary"]]
            outcome.asrs = [float(v) for v in cells["asr"].dropna()]
            drops = (cells["undef_c_acc"] - cells["c_acc"]).dropna()
            outcome.c_acc_drop = float(drops.mean()) if len(drops) else None
        result.append(outcome)
    return result


def _unit_costs(setup: Setup) -> dict[tuple[str, str], float]:
    """Mean wall seconds of each (attack, defense) cell of the setup, and of each attack's stage
    (key (attack, "")): what one seed of each costs."""
    frame = setup.cells[setup.cells["status"] == "done"]
    costs = {(attack, defense): float((group["defense_s"].fillna(0) + group["metrics_s"].fillna(0)).mean())
             for (attack, defense), group in frame.groupby(["attack", "defense"])}
    stages = frame.drop_duplicates("stage_id")
    costs.update({(attack, ""): float(group["stage_s"].mean()) for attack, group in stages.groupby("attack")
                  if group["stage_s"].notna().any()})
    return costs


def relative_cost(setup: Setup, base: Setup) -> tuple[float, int] | None:
    """The setup's cost over the base setup's, on the stages and cells both finished (so a setup
    that ran less is not cheaper for it), and how many kinds of stage and cell that compares."""
    mine, theirs = _unit_costs(setup), _unit_costs(base)
    common = [key for key in mine if key in theirs and theirs[key] > 0]
    if not common:
        return None
    return sum(mine[key] for key in common) / sum(theirs[key] for key in common), len(common)


def _base_setup(setups: list[Setup]) -> Setup:
    """The setup costs are relative to: small-cnn's, the quick profile's historical model, when present."""
    return next((s for s in setups if s.description.get("model") == "small-cnn"), setups[0])


def score_table(reference: Reference, data: ReportData) -> str | None:
    """One row per setup: outcomes reproduced of those it ran, seed spread, cost."""
    if not data.setups:
        return None
    base = _base_setup(data.setups)
    rows = []
    for setup in data.setups:
        found = outcomes(reference, setup)
        ran = [o for o in found if o.reproduced is not None]
        stds = [o.std for o in ran if o.std is not None]
        seeds = sorted({len(o.asrs) for o in ran})
        cost = relative_cost(setup, base)
        rows.append([setup.label, f"**{sum(o.reproduced for o in ran)}** / {len(ran)}",
                     str(len(found) - len(ran)),
                     DASH if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}",
                     f"{sum(stds) / len(stds):.1f} ({len(stds)})" if stds else DASH, f"{max(stds):.1f}" if stds else DASH,
                     f"{cost[0]:.2f}× ({cost[1]})" if cost else DASH])
    return markdown_table(["setup", "reproduced / ran", "not run", "seeds per outcome",
                           "mean std of ASR (outcomes)", "largest std of ASR", f"cost vs {base.label} (kinds compared)"],
                          rows)


def outcome_table(reference: Reference, data: ReportData) -> str | None:
    """One row per published outcome; per setup: its mean ASR ± std (class) and whether it matches."""
    if not data.setups:
        return None
    per_setup = [outcomes(reference, setup) for setup in data.setups]
    rows = []
    for index, item in enumerate(reference.outcomes):
        published = f"{item['asr']:.2f} ({asr_class(item['asr'])})"
        if item.get("c_acc_drop"):
            low, high = item["c_acc_drop"]
            published += f", C-ACC −{low:g} to −{high:g}"
        row = [item["attack"], item["defense"], published]
        for found in per_setup:
            outcome = found[index]
            if outcome.mean is None:
                row.append(DASH)
                continue
            text = f"{outcome.mean:.2f}" + (f" ± {outcome.std:.2f}" if outcome.std is not None else "")
            text += f" ({outcome.found}) {'✓' if outcome.reproduced else '✗'}"
            if outcome.c_acc_drop is not None and item["defense"] != REFERENCE:
                text += f", C-ACC {-outcome.c_acc_drop:+.1f}"
            row.append(text)
        rows.append(row)
    header = ["attack", "defense", "published ASR"] + [setup.label for setup in data.setups]
    return markdown_table(header, rows, ["l", "l", "r"] + ["r"] * len(data.setups))


def section(reference: Reference, data: ReportData, level: str = "##") -> list[str]:
    """The report's section: what the reference is, the score per setup, then every outcome."""
    scores = score_table(reference, data)
    if scores is None:
        return []
    return [f"{level} Against published results: {reference.name}", "",
            f"{reference.setting}. Each published ASR is a class: removed (< 25%), partial (25–75%), kept (≥ 75%); a "
            "setup reproduces an outcome when its mean ASR over seeds (the defense's default configuration) falls in "
            "the same class (docs/protocol.md, \"Fidelity to published results\"). Spread: sample std of ASR over "
            "seeds, per outcome with two seeds or more. Cost: mean wall time of each kind of stage and cell (attack, "
            "defense) that both setups finished, summed, over the same sum for the first setup.", "",
            scores, "", outcome_table(reference, data), ""]
