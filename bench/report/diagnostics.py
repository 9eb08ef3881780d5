"""NONE's diagnostics (channel scores per layer, detection-score histogram) in the report.

The NONE defense draws them into its cell's artifact directory; the report copies them
next to its other figures. When the NONE module offers ``render_diagnostics(artifact_dir,
poisoned_indices)`` it is asked to (re)draw them first, with the ground truth that only
the report (never the defense) may see.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from bench.report.collect import ReportData, Setup
from bench.report.figures import FigureFile, _slug

NONE_DEFENSE = "none"


def _renderer():
    try:
        module = importlib.import_module("defenses.none")
    except ImportError:
        return None
    render = getattr(module, "render_diagnostics", None)
    return render if callable(render) else None


def _poisoned(root: Path, stage_id: str):
    from safetensors.torch import load_file

    path = root / stage_id / "poison.safetensors"
    return load_file(str(path))["poisoned_indices"] if path.is_file() else None


def collect(data: ReportData, setup: Setup, directory: Path) -> tuple[list[tuple[str, list[FigureFile]]], list[str]]:
    """[(heading, figures)] per finished NONE cell (first seed of each attack and variant)."""
    frame = setup.cells
    cells = frame[(frame["defense"] == NONE_DEFENSE) & (frame["status"] == "done")]
    notes: list[str] = []
    groups = []
    render = _renderer()
    for (attack, variant), sub in cells.groupby(["attack_label", "defense_label"], sort=False):
        cell = sub.sort_values("seed").iloc[0]
        source = data.artifacts_root / cell["id"]
        if render is not None and source.is_dir():
            try:
                produced = render(source, _poisoned(data.artifacts_root, cell["stage_id"]))
            except Exception as exc:  # a diagnostics bug must not cost the whole report
                notes.append(f"NONE diagnostics of {attack} ({variant}) failed to render: {exc.__class__.__name__}: {exc}")
                produced = None
        else:
            produced = None
        pngs = _pngs(source, produced)
        if not pngs:
            notes.append(f"{variant} x {attack}: no diagnostics figures in {source}")
            continue
        figures = []
        prefix = f"{_slug(attack)}_{_slug(variant)}_seed{cell['seed']}"
        directory.mkdir(parents=True, exist_ok=True)
        for png in pngs:
            name = f"{prefix}_{_slug(png.stem)}"
            shutil.copyfile(png, directory / f"{name}.png")
            vector = None
            for suffix in (".svg", ".pdf"):
                if png.with_suffix(suffix).is_file():
                    vector = directory / f"{name}{suffix}"
                    shutil.copyfile(png.with_suffix(suffix), vector)
                    break
            figures.append(FigureFile(png.stem.replace("_", " "), directory / f"{name}.png", vector, ""))
        groups.append((f"{variant} on {attack} (seed {cell['seed']})", figures))
    return groups, notes


def _pngs(source: Path, produced) -> list[Path]:
    paths: list[Path] = []
    if isinstance(produced, (str, Path)):
        produced = [produced]
    if isinstance(produced, (list, tuple)):
        paths = [Path(p) for p in produced if str(p).endswith(".png") and Path(p).is_file()]
    elif isinstance(produced, dict):
        paths = [Path(p) for p in produced.values() if str(p).endswith(".png") and Path(p).is_file()]
    if not paths and source.is_dir():
        paths = sorted(source.glob("*.png"))
    return sorted(set(paths))

