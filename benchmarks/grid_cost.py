"""What a grid costs, from the wall times a results store recorded (nothing is re-run).

    python benchmarks/grid_cost.py [--store runs/bench.sqlite] [--dataset fashion-mnist]
                                   [--profile quick] [--out BENCHMARKS.md]

Prints, for one dataset and profile:
- each attack stage's time (training the undefended model, poisoning, evaluation);
- each defense's cell time (defense, evaluation, REASR scan, selection oracle, t-SNE features),
  median over attacks, and the grid's time by phase;
- NONE's analysis (collect, score, select, flag, reset) against its fine-tuning, per cell;
- every (attack, defense) cell's time, as a table;
- the default grid (every registered attack x every registered defense) as measured where the
  store has the cell and projected from that defense's median elsewhere, each marked as such,
  and the wall clock from first start to last finish of each run the store recorded (a grid
  stopped and resumed is several runs; the pause between them is not counted).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
from collections import defaultdict

from bench.registry import ATTACKS, DEFENSES
from bench.store import ResultStore


def cell_phases(cell: dict) -> dict[str, float]:
    """The parts of a cell's time, as bench/cell.py records them: the defense, then each metric."""
    timings = cell.get("timings") or {}
    parts = {"defenses": float(timings.get("defense_s") or 0)}
    for key, seconds in timings.items():
        if key.endswith("_s") and key not in ("attack_s", "defense_s", "metrics_s"):
            parts[f"metric: {key[:-2]}"] = float(seconds or 0)
    return parts


def cell_seconds(cell: dict) -> float:
    return sum(cell_phases(cell).values())


def phases(store: ResultStore, dataset: str, profile: str) -> list[str]:
    """Where the grid's time goes, summed over every finished stage and cell: training the
    undefended models (with their per-epoch curves), then each part of the cells."""
    totals: dict[str, float] = defaultdict(float)
    for stage in store.stages(dataset):
        if stage["status"] == "done" and stage["profile"] == profile and stage.get("timings"):
            totals["attack stages (training with curves, poisoning, evaluation)"] += float(stage["timings"]["total_s"])
    for cell in store.cells(dataset, status="done"):
        if cell["profile"] == profile:
            for name, seconds in cell_phases(cell).items():
                totals[name] += seconds
    whole = sum(totals.values()) or 1.0
    lines = ["| phase | time | share |", "|---|---|---|"]
    lines += [f"| {name} | {minutes(seconds)} | {seconds / whole:.0%} |" for name, seconds in totals.items() if seconds]
    return lines


def collect(store: ResultStore, dataset: str, profile: str) -> tuple[dict[str, float], dict[tuple[str, str], float], list[dict]]:
    stages = {s["attack"]: float(s["timings"]["total_s"]) for s in store.stages(dataset)
              if s["status"] == "done" and s["profile"] == profile and s.get("timings")}
    per_cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    none_cells = []
    for cell in store.cells(dataset, status="done"):
        if cell["profile"] != profile:
            continue
        per_cell[(cell["attack"], cell["defense"])].append(cell_seconds(cell))
        if cell["defense"] == "none" and (cell.get("details") or {}).get("timings"):
            none_cells.append(cell)
    return stages, {key: statistics.median(values) for key, values in per_cell.items()}, none_cells


PAUSE_S = 600.0  # a gap longer than any cell's setup: the grid was stopped and resumed later


def runs(rows: list[dict], pause_s: float = PAUSE_S) -> list[tuple[float, float]]:
    """(first start, last finish) of each run in the rows: a resumed grid is several runs, split where
    nothing ran for more than ``pause_s``, so the time it stood stopped is not counted as its cost."""
    spans = sorted((r["started"], r["finished"]) for r in rows if r.get("started") is not None and r.get("finished") is not None)
    merged: list[list[float]] = []
    for start, finish in spans:
        if merged and start - merged[-1][1] <= pause_s:
            merged[-1][1] = max(merged[-1][1], finish)
        else:
            merged.append([start, finish])
    return [(start, finish) for start, finish in merged]


def profile_rows(store: ResultStore, dataset: str, profile: str) -> list[dict]:
    return [r for r in store.stages(dataset) + store.cells(dataset) if r["profile"] == profile]


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def report(store: ResultStore, dataset: str, profile: str) -> list[str]:
    stages, cells, none_cells = collect(store, dataset, profile)
    attacks, defenses = ATTACKS.names(), DEFENSES.names()
    lines = [f"#### Attack stages ({dataset}, {profile} profile)", "", "| attack | stage wall time |", "|---|---|"]
    lines += [f"| {a} | {minutes(stages[a])} |" for a in attacks if a in stages]
    by_defense: dict[str, list[float]] = defaultdict(list)
    for (_, defense), seconds in cells.items():
        by_defense[defense].append(seconds)
    median = {d: statistics.median(v) for d, v in by_defense.items()}
    lines += ["", "#### Defense cells (defense, evaluation, scan, oracle, features), median over attacks", "",
              "| defense | kind | median | min | max | cells |", "|---|---|---|---|---|---|"]
    for d in defenses:
        if d in by_defense:
            v = by_defense[d]
            lines.append(f"| {d} | {DEFENSES.get(d).kind} | {minutes(median[d])} | {minutes(min(v))} | {minutes(max(v))} | {len(v)} |")
    present = [a for a in attacks if a in stages or any(key[0] == a for key in cells)]
    if present:
        lines += ["", "#### Each cell (defense, evaluation, scan, oracle, features; the stage column: training the undefended model)", "",
                  "| attack | stage | " + " | ".join(defenses) + " |", "|---" * (len(defenses) + 2) + "|"]
        for a in present:
            row = [minutes(stages[a]) if a in stages else "—"]
            row += [minutes(cells[(a, d)]) if (a, d) in cells else "—" for d in defenses]
            lines.append(f"| {a} | " + " | ".join(row) + " |")
    if none_cells:
        lines += ["", "#### NONE: analysis vs fine-tuning", "",
                  "| attack | config | analysis | fine-tuning | analysis / fine-tuning |", "|---|---|---|---|---|"]
        for cell in none_cells:
            t = cell["details"]["timings"]
            config = cell["config"]["defense_config"]
            short = ", ".join(f"{k}={config[k]}" for k in ("max_reset_fraction", "finetune_lr", "rounds") if k in config)
            ratio = t["analysis_s"] / t["finetune_s"] if t.get("finetune_s") else float("nan")
            lines.append(f"| {cell['attack']} | {short} | {t['analysis_s']:.1f} s | {t['finetune_s']:.1f} s | {ratio:.1%} |")
    lines += ["", "#### Phases, summed over the store's stages and cells", "", *phases(store, dataset, profile)]
    measured, projected, unknown = 0.0, 0.0, []
    stage_median = statistics.median(stages.values()) if stages else None
    for a in attacks:
        if a in stages:
            measured += stages[a]
        elif stage_median is not None:
            projected += stage_median
        else:
            unknown.append(f"{a} stage")
        for d in defenses:
            if (a, d) in cells:
                measured += cells[(a, d)]
            elif d in median:
                projected += median[d]
            else:
                unknown.append(f"{a} x {d}")
    lines += ["", f"#### Default grid: {len(attacks)} attacks x {len(defenses)} defenses", "",
              f"- measured cells and stages: {minutes(measured)}",
              f"- projected for the rest (median of the same defense / stage): {minutes(projected)}",
              f"- total: **{minutes(measured + projected)}**"]
    if unknown:
        lines.append(f"- never measured, not counted: {', '.join(unknown)}")
    spans = runs(profile_rows(store, dataset, profile))
    if spans:
        each = ", ".join(f"{minutes(finish - start)} (from {datetime.datetime.fromtimestamp(start):%Y-%m-%d %H:%M})"
                         for start, finish in spans)
        lines.append(f"- wall clock in the store, first start to last finish of each run (data loading and checkpoints "
                     f"included, the report not; pauses over {PAUSE_S / 60:.0f} min split runs): "
                     f"**{minutes(sum(finish - start for start, finish in spans))}** in {len(spans)} run(s): {each}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/bench.sqlite")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default=None, help="append the tables to this markdown file")
    args = parser.parse_args()
    lines = report(ResultStore(args.store), args.dataset, args.profile)
    print("\n".join(lines))
    if args.out:
        header = f"\n### Grid cost from `{args.store}`, {datetime.date.today().isoformat()}\n"
        with open(args.out, "a") as handle:
            handle.write(header + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
