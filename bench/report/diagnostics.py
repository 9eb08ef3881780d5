"""Figures a defense ships for its own cells (``Defense.report_figures``), e.g. NONE's channel
scores and detection histogram. The report finds the hook through the registry and calls it with
the stage's ground truth, which only the report (never the defense's run) may see; it never
imports a defense's module.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.report.collect import ReportData, Setup
from bench.report.figures import FigureFile, _slug


def _hook(defense: str):
    """The defense's class when it ships figures, else None (unknown here, or no hook)."""
    from bench.defense import Defense
    from bench.registry import DEFENSES

    if defense not in DEFENSES:
        return None
    cls = DEFENSES.get(defense)
    overridden = getattr(cls, "report_figures", None) is not None and \
        getattr(cls.report_figures, "__func__", None) is not getattr(Defense.report_figures, "__func__", None)
    return cls if overridden else None


def _poisoned(root: Path, stage_id: str):
    from safetensors.torch import load_file

    path = root / stage_id / "poison.safetensors"
    return load_file(str(path))["poisoned_indices"] if path.is_file() else None


def collect(data: ReportData, setup: Setup, figure_dir: Path,
            prefix: str) -> tuple[list[tuple[str, str, list[tuple[str, list[FigureFile]]]]], list[str]]:
    """[(title, caption, [(heading, figures)])] per defense with a figure hook: the first seed of
    each of its finished (attack, variant) cells, copied to ``figure_dir/<prefix><defense>/``. When
    the hook draws nothing, the PNGs the defense left in its cell directory are used."""
    frame = setup.cells
    notes: list[str] = []
    sections = []
    for defense in sorted(frame["defense"].unique()):
        cls = _hook(defense)
        if cls is None:
            continue
        groups = []
        cells = frame[(frame["defense"] == defense) & (frame["status"] == "done")]
        for (attack, variant), sub in cells.groupby(["attack_label", "defense_label"], sort=False):
            cell = sub.sort_values("seed").iloc[0]
            source = data.artifacts_root / cell["id"]
            try:
                produced = cls.report_figures(source, _poisoned(data.artifacts_root, cell["stage_id"])) \
                    if source.is_dir() else None
            except Exception as exc:  # a figure bug must not cost the whole report
                notes.append(f"{defense} figures of {attack} ({variant}) failed to render: {exc.__class__.__name__}: {exc}")
                produced = None
            pngs = [Path(p) for p in produced or [] if str(p).endswith(".png") and Path(p).is_file()]
            if not pngs and source.is_dir():
                pngs = sorted(source.glob("*.png"))
            if not pngs:
                notes.append(f"{variant} x {attack}: no {defense} figures in {source}")
                continue
            figures = []
            stem = f"{_slug(attack)}_{_slug(variant)}_seed{cell['seed']}"
            target = figure_dir / f"{prefix}{_slug(defense)}"
            target.mkdir(parents=True, exist_ok=True)
            for png in sorted(set(pngs)):
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
            sections.append((cls.report_figures_title or f"{defense} figures", cls.report_figures_caption, groups))
    return sections, notes
