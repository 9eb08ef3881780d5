"""Figures a defense ships for its own cells (``Defense.report_figures``), e.g. NONE's channel
scores and detection histogram. The cell pipeline draws them into the cell's artifact directory
with the stage's ground truth (bench/cell.py, ``draw_defense_figures``); the report copies the
PNGs it finds there, under the title and caption the store's catalog records for the defense, so
it never needs the defense's code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.reporting.collect import ReportData, Setup, figure_seed
from bench.reporting.figures import FigureFile, _slug


def collect(data: ReportData, setup: Setup, figure_dir: Path,
            prefix: str) -> tuple[list[tuple[str, str, list[tuple[str, list[FigureFile]]]]], list[str]]:
    """[(title, caption, [(heading, figures)])] per defense whose catalog entry names a figure
    section: the first seed of each of its finished (attack, variant) cells, copied to
    ``figure_dir/<prefix><defense>/``."""
    frame = setup.cells
    notes: list[str] = []
    sections = []
    for defense in sorted(frame["defense"].unique()):
        info = data.catalog.defenses.get(defense, {})
        if not info.get("figures_title"):
            continue
        groups = []
        cells = frame[(frame["defense"] == defense) & (frame["status"] == "done")]
        for (attack, variant), sub in cells.groupby(["attack_label", "defense_label"], sort=False):
            seed = figure_seed(sub, data.files)
            cell = sub[sub["seed"] == seed].iloc[0]
            source = data.files.directory(cell["id"])
            failed = (cell["details"] or {}).get("figures_error")
            if failed:
                notes.append(f"{variant} x {attack}: {defense} figures failed to render ({failed})")
            pngs = sorted(source.glob("*.png")) if source.is_dir() else []
            if not pngs:
                if not failed:
                    notes.append(f"{variant} x {attack}: no {defense} figures in {source}")
                continue
            figures = []
            stem = f"{_slug(attack)}_{_slug(variant)}_seed{cell['seed']}"
            target = figure_dir / f"{prefix}{_slug(defense)}"
            target.mkdir(parents=True, exist_ok=True)
            for png in pngs:
                name = f"{stem}_{_slug(png.stem)}"
                shutil.copyfile(png, target / f"{name}.png")
                vector = None
                for suffix in (".svg", ".pdf"):
                    if png.with_suffix(suffix).is_file():
                        vector = target / f"{name}{suffix}"
                        shutil.copyfile(png.with_suffix(suffix), vector)
                        break
                figures.append(FigureFile(png.stem.replace("_", " "), target / f"{name}.png", vector, ""))
            groups.append((f"{variant} on {attack} (seed {cell['seed']})", figures))
        if groups:
            sections.append((info["figures_title"], info.get("figures_caption", ""), groups))
    return sections, notes
