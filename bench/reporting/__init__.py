"""Reports rendered from the results store, and only from it (plus the artifact directories
its rows point to): ``reports/<dataset>/`` (README.md with tables and figures, results.csv,
results.json, figures/) and ``reports/README.md`` across datasets.

Modules: ``catalog`` (what the runs recorded of the plugins: display names, metric columns,
focus), ``collect`` (store -> tidy frame), ``tables`` (markdown), ``figures`` (seaborn),
``tsne`` (the features cells stored), ``published`` (published outcomes reproduced?), ``diagnostics`` (figures defenses drew for their own
cells), ``reasr`` (the trigger-inversion scan: table and figures), ``selection`` (did a defense
hit the backdoor's units), ``exports`` (CSV/JSON), ``summary`` (cross-dataset measures).
Every metric the catalog records gets a section: its own module's where it has one, else a
table of its columns. The *focus* defense (``report --focus``; by default the one the catalog
names, NONE) gets the headline ASR reduction factor and the t-SNE panel beside the undefended model.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from bench.reporting import (
    across,
    diagnostics,
    exports,
    figures,
    published,
    ranking,
    reasr,
    selection,
    tables,
    tsne,
)
from bench.reporting.collect import ReportData, Setup, load
from bench.reporting.figures import FigureFile
from bench.reporting.palette import defense_palette
from bench.reporting.summary import reduction_factor, resolve_focus, write_index

__all__ = ["write_report", "write_index", "load"]


def write_report(store, dataset: str, out_dir: Path, *, tsne_figure: bool = True, focus: str | None = None,
                 reference: Path | None = None) -> Path:
    """Write ``<out_dir>/<dataset>/`` (README.md, results.csv, results.json, figures/) and return
    that directory. ``tsne_figure=False`` skips the t-SNE embedding (the slowest part);
    ``reference``: a file of published outcomes to score every setup against (published.py)."""
    plugin_notes = recorded_plugins(store.cells(dataset=dataset))
    data = load(store, dataset)
    directory = Path(out_dir) / dataset
    directory.mkdir(parents=True, exist_ok=True)
    figure_dir = directory / "figures"
    shutil.rmtree(figure_dir, ignore_errors=True)  # figures of cells no longer in the store must not linger
    figure_dir.mkdir()
    exports.write_csv(data, directory / "results.csv")
    exports.write_json(data, directory / "results.json")
    focus = resolve_focus(data.catalog, focus)
    name = data.catalog.defense_display(focus)
    palette = defense_palette(data.catalog, sorted(data.cells["defense"].unique()) if not data.cells.empty else [])
    lines = tables.page_start(directory, f"Backdoor defenses on {dataset}")
    if plugin_notes:
        lines += ["**Plugins from outside the project** (recorded with the cells):", ""]
        lines += [f"- {note}" for note in plugin_notes] + [""]
    if not data.setups:
        lines += ["The results store holds no cells for this dataset yet: run `python -m bench run --dataset "
                  f"{dataset}`.", ""]
    else:
        factor = reduction_factor(data.main, focus, name)
        if factor is not None:
            lines += [f"**{name}'s ASR reduction vs undefended** ({data.main.label}): {factor.text()}.", ""]
        elif focus not in set(data.cells["defense"]):
            lines += [f"The focus defense `{focus}` has no cells here (`report --focus <defense>` picks another).", ""]
        if len(data.superseded):
            lines += [f"{len(data.superseded)} older cell(s) of the same settings, from before a plugin or core version "
                      "change, are superseded by their re-runs and not shown (they remain in the store).", ""]
        several = len(data.setups) > 1
        if several:
            lines += [f"The store holds {len(data.setups)} setups for {dataset}; they are reported separately, "
                      "the one with most finished cells first.", ""]
        if reference is not None:
            lines += published.section(published.Reference.load(reference), data)
        across_setups = across.table(data, focus)  # None unless several setups hold its cells
        if across_setups:
            lines += [f"## {name} across setups", "",
                      f"Every configuration of `{focus}` in every setup, mean ± std over seeds (C-ACC, ASR and the "
                      "selection and detection metrics as in each setup's own tables below).", "", across_setups, ""]
        for number, setup in enumerate(data.setups, start=1):
            prefix = f"s{number}_" if several else ""
            level = "###" if several else "##"
            if several:
                lines += [f"## Setup {number}: {setup.label}", ""]
            lines += _section(data, setup, figure_dir, prefix, palette, level, tsne_figure, focus)
    lines += ["## Files", "", "- [`results.csv`](results.csv): one row per cell and metric (tidy)",
              "- [`results.json`](results.json): every cell and stage as stored, and the aggregated table",
              "- `figures/`: every figure as PNG and SVG", ""]
    (directory / "README.md").write_text("\n".join(lines))
    return directory


def recorded_plugins(cells: list[dict]) -> list[str]:
    """A note per plugin from outside the project that the store's cells used: what it is, and
    whether its file is still where it was and unchanged, which Reproduce needs. Nothing of it is
    imported: the report needs no plugin's code (the store's catalog has what it shows)."""
    from bench import progress

    seen: dict[str, dict] = {}
    for cell in cells:
        for plugin in cell.get("plugins") or []:
            seen.setdefault(plugin.get("path") or plugin.get("module"), plugin)
    notes = []
    for key, plugin in sorted(seen.items()):
        label = f"{plugin['kind']} `{plugin['name']}`"
        if plugin.get("via") != "file":
            notes.append(f"{label}: entry point `{plugin.get('module')}` (sha256 {plugin['sha256']}); install its package "
                         "to reproduce these cells")
            continue
        path = Path(key)
        if not path.is_file():
            notes.append(f"{label}: `{path}` is missing here, so Reproduce needs the file back")
            progress.log(f"[yellow]report: plugin file {path} is missing[/yellow]")
            continue
        note = f"{label}: `{path}` (sha256 {plugin['sha256']})"
        current = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if current != plugin["sha256"]:
            note += f"; the file has changed since these cells ran (now {current}): running it again gives new results"
        notes.append(note)
    return notes


def _figure_lines(figure: FigureFile | None, directory: Path, level: str) -> list[str]:
    if figure is None:
        return []
    png = figure.png.relative_to(directory).as_posix()
    lines = [f"{level} {figure.title}", "", f"![{figure.title}]({png})", ""]
    extra = []
    if figure.caption:
        extra.append(figure.caption[0].upper() + figure.caption[1:] + ".")
    if figure.svg is not None:
        extra.append(f"[{figure.svg.suffix[1:].upper()}]({figure.svg.relative_to(directory).as_posix()})")
    if extra:
        lines += [" ".join(extra), ""]
    return lines


def _reasr_lines(data: ReportData, setup: Setup, figure_dir: Path, prefix: str, palette: dict,
                 level: str) -> tuple[list[str], list[str]]:
    """The REASR section: per scanned attack row, its table and its figures beside it."""
    blocks, notes = reasr.collect(data, setup, figure_dir, prefix, palette)
    if not blocks:
        return [], notes
    lines = [f"{level} REASR (trigger inversion)", "", reasr.EXPLANATION, ""]
    for block in blocks:
        lines += [f"{level}# {block.attack}", "", block.table, ""]
        for figure in block.figures:
            lines += _figure_lines(figure, figure_dir.parent, level + "##")
    return lines, notes


def _section(data: ReportData, setup: Setup, figure_dir: Path, prefix: str, palette: dict, level: str,
             tsne_figure: bool, focus: str) -> list[str]:
    directory = figure_dir.parent
    sub = level + "#"
    notes: list[str] = []
    lines = [f"{level} Setup", "", tables.setup_table(setup, data.dataset, data.catalog), "",
             "Reproduce (rebuilt from the store: the options each cell was run with; one command per set of "
             "options the user set):", "", "```bash",
             *tables.reproduce_commands(setup, data.dataset), "```", ""]
    lines += [f"{level} Results", "",
              "Each entry: **C-ACC / ASR / RA · DER** — clean accuracy, attack success rate and robust accuracy in %, "
              "DER in [0, 1] (0.5: no change; higher is better). Mean ± sample std over seeds when there are several. "
              "**failed**: the cell failed (see below); —: not run; `benign` has no trigger, so no ASR/RA/DER.", "",
              tables.results_table(setup), ""]
    ranked = ranking.ranking_section(setup)
    if ranked:
        lines += [f"{level} Ranking", ""] + ranked
    for metric, info in data.catalog.metrics.items():
        title, description = info.get("title") or metric, info.get("description", "")
        if metric in ("accuracy", "features"):  # the results table above; the t-SNE below
            continue
        if metric == "detection":
            detection = tables.detection_table(setup, focus)
            if detection:
                lines += [f"{level} {title}", "", description, "", detection, ""]
        elif metric == "selection":
            hits = selection.table(setup)
            if hits:
                lines += [f"{level} {title}", "", description, "", hits, ""]
                lines += _figure_lines(selection.figure(setup, palette, figure_dir / f"{prefix}selection"), directory, sub)
        elif metric == "reasr":
            scan_lines, scan_notes = _reasr_lines(data, setup, figure_dir, prefix, palette, level)
            lines += scan_lines
            notes += scan_notes
        else:  # a metric without a section of its own (a plugin's): a table of its columns
            table = tables.metric_table(setup, [data.catalog.columns[c] for c in data.catalog.metric_columns(metric)])
            if table:
                lines += [f"{level} {title}", ""] + ([description, ""] if description else []) + [table, ""]
    lines += [f"{level} Cost", "", "Wall seconds on the device above: the attack stage trains the undefended model once "
              "per attack and seed and is shared by every defense; defense columns are the defense alone.", "",
              tables.cost_table(setup), ""]
    failures = tables.failures_table(setup, data.stages)
    if failures:
        lines += [f"{level} Failed and unfinished cells", "", failures, ""]
    lines += [f"{level} Figures", ""]
    for name, column in data.catalog.columns.items():
        if column.get("heatmap") and setup.cells[name].notna().any():
            lines += _figure_lines(figures.heatmap(setup, column, figure_dir / f"{prefix}heatmap_{name}"), directory, sub)
    lines += _figure_lines(figures.scatter(setup, palette, figure_dir / f"{prefix}acc_vs_asr"), directory, sub)
    lines += _figure_lines(figures.bars(setup, palette, figure_dir / f"{prefix}bars"), directory, sub)
    curve, curve_notes = figures.curves(setup, palette, data.files, figure_dir / f"{prefix}curves")
    lines += _figure_lines(curve, directory, sub)
    notes += curve_notes
    sections, diag_notes = diagnostics.collect(data, setup, figure_dir, prefix)
    notes += diag_notes
    for title, caption, groups in sections:
        lines += [f"{sub} {title}", ""] + ([caption, ""] if caption else [])
        for heading, group in groups:
            lines += [f"**{heading}**", ""]
            for figure in group:
                lines += [f"![{figure.title}]({figure.png.relative_to(directory).as_posix()})", ""]
    if tsne_figure:
        embedding, tsne_notes = tsne.render(data, setup, figure_dir / f"{prefix}tsne", focus)
        lines += _figure_lines(embedding, directory, sub)
        notes += [f"t-SNE: {n}" for n in tsne_notes]
    else:
        notes.append("t-SNE skipped on request")
    for figure in figures.sweeps(setup, palette, figure_dir, prefix):
        lines += _figure_lines(figure, directory, sub)
    if notes:
        lines += [f"{level} Notes", ""] + [f"- {note}" for note in notes] + [""]
    return lines

