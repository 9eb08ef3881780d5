"""REASR (trigger inversion, bench/metrics/reasr.py) in the report: per attack, a table of REASR per
size bound, REASR against the bound, and the reversed triggers.

Numbers come from the store (``metrics["reasr"]`` and the details the ``reasr`` metric stored); only the trigger
images come from the cells' artifact directories (``scan.safetensors``), so a cell whose
artifacts are gone loses its row of the trigger grid, never its numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.reporting.collect import ItemFiles, ReportData, Setup, aggregate, lookup, status_of
from bench.reporting.figures import FigureFile, _slug, save, style
from bench.reporting.tables import (
    DASH,
    entry_text,
    fmt_stat,
    markdown_table,
    partial_note,
)

SCAN_FILE = "scan.safetensors"
MAX, MEAN = "reasr_max", "reasr_mean"
EXPLANATION = ("REASR: the share (%) of held-out clean images — not of the label, and not already predicted as it — "
               "that the best reversed trigger within the size bound (% of the image area) sends to its label; "
               "max and mean are over the bounds. Lower is better: a high REASR means a small trigger controls the "
               "model (a planted or natural backdoor). Mean ± sample std over seeds when there are several.")


@dataclass
class Block:
    """One attack row's REASR results: its table and figures."""

    attack: str
    table: str
    figures: list[FigureFile] = field(default_factory=list)


def scan_of(measured) -> dict | None:
    """A cell's stored scan summary (its ``measured`` details), or None when it did not scan."""
    scan = measured.get("reasr") if isinstance(measured, dict) else None
    return scan if isinstance(scan, dict) and isinstance(scan.get("reasr"), dict) and scan["reasr"] else None


def per_bound(measured) -> dict[float, float]:
    """bound (fraction of the area) -> REASR %; JSON keys are bound strings."""
    scan = scan_of(measured)
    return {} if scan is None else {float(b): float(v) for b, v in scan["reasr"].items() if v is not None}


def bound_column(bound: float) -> str:
    return f"reasr@{bound:g}"


def with_scan_columns(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[float]]:
    """The cells with a REASR column per bound plus max and mean over bounds (NaN where a cell
    did not scan), and the bounds found, so that ``aggregate`` gives mean ± std over seeds."""
    values = [per_bound(d) for d in cells["measured"]]
    bounds = sorted({b for v in values for b in v})
    columns = {bound_column(b): [v.get(b, math.nan) for v in values] for b in bounds}
    columns[MAX] = list(cells["reasr"])  # as the exports hold it
    columns[MEAN] = [float((scan_of(d) or {}).get("mean_reasr", math.nan)) for d in cells["measured"]]
    return cells.assign(**columns), bounds


def scanned_attacks(setup: Setup) -> list[str]:
    """Attack rows (display order) with at least one cell that ran the scan."""
    frame = setup.cells
    return [a for a in setup.attacks if any(scan_of(d) for d in frame.loc[frame["attack_label"] == a, "measured"])]


def reasr_table(cells: pd.DataFrame, bounds: list[float], defenses: list[str]) -> str:
    """Rows: defenses; columns: REASR per bound, then max and mean over bounds."""
    names = tuple(bound_column(b) for b in bounds) + (MAX, MEAN)
    table = aggregate(cells, ["defense_label"], names)
    rows = []
    for defense in defenses:
        record = lookup(table, defense_label=defense)
        status = status_of(record)
        if status in ("done", "partial"):
            entries = [fmt_stat(record, name) for name in names]
            if status == "partial":
                entries[-1] += partial_note(record)
        else:
            entries = [entry_text(record, status, ())] + [DASH] * (len(names) - 1)
        rows.append([defense, *entries])
    return markdown_table(["defense", *(f"{100 * b:g}%" for b in bounds), "max", "mean"], rows)


def curve_figure(cells: pd.DataFrame, bounds: list[float], palette: dict[str, str], attack: str,
                 stem: Path) -> FigureFile | None:
    """REASR against the bound, one line per defense (its primary variant), mean ± std over seeds."""
    from bench.reporting.reasr_figures import plot_reasr

    names = tuple(bound_column(b) for b in bounds)
    table = aggregate(cells[cells["primary"]], ["defense"], names)
    curves, errors = {}, {}
    for _, record in table.iterrows():
        points = {b: record[bound_column(b)] for b in bounds if not math.isnan(record[bound_column(b)])}
        if points:
            curves[record["defense"]] = points
            errors[record["defense"]] = {b: record[f"{bound_column(b)}_std"] for b in points}
    if not curves:
        return None
    title = f"REASR vs trigger size bound — {attack}"
    with style():
        return save(plot_reasr(curves, title, colors=palette, errors=errors), stem, title,
                    "mean over seeds, error bars: std; lower is better")


def load_triggers(directory: Path, scan: dict):
    """The cell's stored triggers, or (None, why) when its artifacts are missing or unreadable."""
    from safetensors.torch import load_file

    from bench.reporting.reasr_figures import StoredTriggers

    path = directory / SCAN_FILE
    if not path.is_file():
        return None, f"no {SCAN_FILE} in {directory}"
    try:
        return StoredTriggers.from_stored(load_file(str(path)), scan), ""
    except Exception as exc:  # a truncated or foreign file costs its grid row, not the report
        return None, f"{path} unreadable: {exc.__class__.__name__}: {exc}"


def _first_triggers(cells: pd.DataFrame, files: ItemFiles):
    """(row label, triggers, []) of the first seed whose triggers load, else (None, None, why not)."""
    reasons = []
    for _, cell in cells.sort_values("seed").iterrows():
        scan = scan_of(cell["measured"])
        if scan is None:
            continue
        triggers, why = load_triggers(files.directory(cell["id"]), scan)
        if triggers is not None:
            return f"{cell['defense']} (seed {cell['seed']})", triggers, []
        reasons.append(why)
    return None, None, reasons


def trigger_figure(cells: pd.DataFrame, files: ItemFiles, attack: str, stem: Path) -> tuple[FigureFile | None, list[str]]:
    """Rows: defenses (primary variants, first seed whose triggers load); columns: bounds."""
    from bench.reporting.reasr_figures import trigger_grid

    done = cells[cells["primary"] & (cells["status"] == "done")]
    rows, notes = {}, []
    for defense, sub in done.groupby("defense_label", sort=False):
        label, triggers, reasons = _first_triggers(sub, files)
        if triggers is not None:
            rows[label] = triggers
        elif reasons:
            notes.append(f"reversed triggers of {defense} on {attack} not drawn: {'; '.join(reasons)}")
    if not rows:
        return None, notes
    with style():
        figure = save(trigger_grid(rows), stem, f"Reversed triggers — {attack}",
                      "the best candidate's trigger per size bound, stamped on mid-grey; title: bound, label y and "
                      "REASR of that seed")
    return figure, notes


def collect(data: ReportData, setup: Setup, figure_dir: Path, prefix: str,
            palette: dict[str, str]) -> tuple[list[Block], list[str]]:
    """One block per attack row that has a scanned cell, and notes on what could not be drawn."""
    blocks, notes = [], []
    for attack in scanned_attacks(setup):
        sub = setup.cells[setup.cells["attack_label"] == attack]
        cells, bounds = with_scan_columns(sub)
        defenses = [d for d in setup.defenses if d in set(sub["defense_label"])]
        block = Block(attack, reasr_table(cells, bounds, defenses))
        slug = _slug(attack)
        curve = curve_figure(cells, bounds, palette, attack, figure_dir / f"{prefix}reasr_{slug}")
        grid, grid_notes = trigger_figure(cells, data.files, attack, figure_dir / f"{prefix}triggers_{slug}")
        block.figures = [f for f in (curve, grid) if f is not None]
        notes += grid_notes
        blocks.append(block)
    return blocks, notes
