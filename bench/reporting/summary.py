"""Cross-dataset measures and ``reports/README.md``, the page every dataset's report hangs from.

Per dataset the main setup (most finished cells) is summarised by each defense's default
variant: mean ASR over the attacks that have a trigger, mean C-ACC over all attacks, over
the finished cells of every seed. The focus defense's ASR reduction factor (by default that of the
defense the store's catalog names as the benchmark's focus; NONE's paper's headline measure) is
mean undefended ASR / mean defended ASR over the same (attack, seed) pairs — each cell against
the undefended model of its own attack stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.reporting.catalog import Catalog
from bench.reporting.collect import REFERENCE, Setup, load
from bench.reporting.tables import DASH, GENERATED, fmt, markdown_table, page_start


def resolve_focus(catalog: Catalog, focus: str | None) -> str:
    """The focus defense: the one asked for, else the one the catalog names, else the reference."""
    return focus or catalog.focus() or REFERENCE


@dataclass
class Factor:
    undefended: float
    defended: float
    pairs: int
    name: str  # the defense's display name
    @property
    def value(self) -> float:
        if self.defended > 0:
            return self.undefended / self.defended
        return math.inf if self.undefended > 0 else 1.0

    def short(self) -> str:
        return "∞" if math.isinf(self.value) else f"{self.value:.2f}×"

    def text(self) -> str:
        return (f"{self.short()} lower ASR (mean undefended {self.undefended:.2f}% → {self.name} {self.defended:.2f}% "
                f"over {self.pairs} attack × seed pair{'s' if self.pairs != 1 else ''})")


def reduction_factor(setup: Setup | None, defense: str, name: str | None = None) -> Factor | None:
    if setup is None:
        return None
    frame = setup.cells
    cells = frame[(frame["defense"] == defense) & frame["primary"] & (frame["status"] == "done")
                  & frame["asr"].notna() & frame["undef_asr"].notna()]
    if cells.empty:
        return None
    return Factor(float(cells["undef_asr"].mean()), float(cells["asr"].mean()), len(cells), name or defense)


def pooled_factor(setups: list[Setup], defense: str, name: str | None = None) -> Factor | None:
    factors = [f for f in (reduction_factor(s, defense, name) for s in setups) if f is not None]
    if not factors:
        return None
    pairs = sum(f.pairs for f in factors)
    return Factor(sum(f.undefended * f.pairs for f in factors) / pairs, sum(f.defended * f.pairs for f in factors) / pairs,
                  pairs, name or defense)


def dataset_summary(setup: Setup, dataset: str) -> pd.DataFrame:
    """One row per defense: mean ASR and C-ACC of its finished cells, and how many cells there are.
    ``undefended`` comes from the attack stages themselves (present even when that row was not run)."""
    frame = setup.cells
    rows = []
    stages = frame.drop_duplicates("stage_id")
    done_stages = stages[stages["stage_status"] == "done"]
    rows.append({"dataset": dataset, "defense": REFERENCE, "asr": _mean(done_stages["undef_asr"]),
                 "c_acc": _mean(done_stages["undef_c_acc"]), "n_done": len(done_stages), "n": len(stages)})
    primary = frame[frame["primary"] & (frame["defense"] != REFERENCE)]
    for defense, group in primary.groupby("defense"):
        done = group[group["status"] == "done"]
        rows.append({"dataset": dataset, "defense": defense, "asr": _mean(done["asr"]), "c_acc": _mean(done["c_acc"]),
                     "n_done": len(done), "n": len(group)})
    return pd.DataFrame(rows)


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def write_index(store, out_dir: Path, focus: str | None = None, reference: Path | None = None) -> Path:
    """``<out_dir>/README.md``: every dataset's report, the cross-dataset summary table and figure,
    and the focus defense's ASR reduction factor per dataset and overall. README.md, so that a
    browsed ``reports/`` (or a study's directory) opens on it; NOTES.md beside it is included, as
    beside a dataset's report."""
    from bench.reporting.figures import summary as summary_figure
    from bench.reporting.palette import defense_palette

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.from_store(store)
    focus = resolve_focus(catalog, focus)
    name = catalog.defense_display(focus)
    datasets = store.datasets()
    loaded = {dataset: load(store, dataset) for dataset in datasets}
    lines = page_start(out_dir, "Backdoor defense benchmark — results")
    if not datasets:
        lines += ["The results store holds no cells yet.", ""]
        return _write_index_page(out_dir, lines)
    rows = []
    for dataset, data in loaded.items():
        counts = data.cells["status"].value_counts()
        report = out_dir / dataset / "README.md"
        link = f"[{dataset}/README.md]({dataset}/README.md)" if report.is_file() else \
            f"not rendered yet (`python -m bench report --dataset {dataset}`)"
        extra = f" (+{len(data.setups) - 1} other setup{'s' if len(data.setups) > 2 else ''})" if len(data.setups) > 1 else ""
        rows.append([dataset, data.main.label + extra,
                     ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "failed", "running", "interrupted") if counts.get(s, 0)), link])
    lines += ["## Reports", "", markdown_table(["dataset", "setup", "cells", "report"], rows, ["l"] * 4), ""]
    lines += _other_reports(out_dir, datasets)
    if reference is not None:
        from bench.reporting.published import Reference, score_table

        published = Reference.load(reference)
        for dataset, data in loaded.items():
            scores = score_table(published, data)
            if scores:
                lines += [f"## {dataset}: published outcomes reproduced ({published.name})", "",
                          f"{published.setting}; the outcome per setup is in [{dataset}/README.md]({dataset}/README.md).",
                          "", scores, ""]
    table = pd.concat([dataset_summary(data.main, dataset) for dataset, data in loaded.items()], ignore_index=True)
    defenses = [REFERENCE] + sorted(d for d in table["defense"].unique() if d != REFERENCE)
    rows = []
    for defense in defenses:
        row = [defense]
        for dataset in datasets:
            hit = table[(table["dataset"] == dataset) & (table["defense"] == defense)]
            row.append(_summary_entry(hit.iloc[0]) if len(hit) else DASH)
        sub = table[table["defense"] == defense]
        asr, acc = sub["asr"].dropna(), sub["c_acc"].dropna()
        row.append(f"{fmt(asr.mean() if len(asr) else None)} / {fmt(acc.mean() if len(acc) else None)}")
        rows.append(row)
    lines += ["## Cross-dataset summary", "",
              "Each entry: **mean ASR / mean C-ACC** (%) of the defense's default configuration over the attacks "
              "(ASR: attacks with a trigger) and seeds of the dataset's main setup; (k/n): only k of its n cells "
              "finished. Last column: the unweighted mean over datasets.", "",
              markdown_table(["defense", *datasets, "mean over datasets"], rows), ""]
    rows = []
    for dataset, data in loaded.items():
        factor = reduction_factor(data.main, focus, name)
        rows.append([dataset, fmt(factor.undefended) if factor else DASH, fmt(factor.defended) if factor else DASH,
                     factor.short() if factor else DASH, str(factor.pairs) if factor else "0"])
    overall = pooled_factor([data.main for data in loaded.values()], focus, name)
    if len(datasets) > 1:
        rows.append(["**all datasets**", fmt(overall.undefended) if overall else DASH,
                     fmt(overall.defended) if overall else DASH, overall.short() if overall else DASH,
                     str(overall.pairs) if overall else "0"])
    headline = catalog.headline(focus)
    lines += [f"## {name}'s ASR reduction factor", "",
              f"Mean ASR of the undefended models / mean ASR of {name} over the same attack × seed pairs (each {name} "
              "cell against its own attack stage)." + (f" {headline}" if headline else ""), "",
              markdown_table(["dataset", "undefended ASR %", f"{name} ASR %", "reduction", "pairs"], rows), ""]
    palette = defense_palette(catalog, list(table["defense"].unique()))
    figure = summary_figure(table, palette, out_dir / "summary")
    if figure is not None:
        lines += [f"![{figure.title}](summary.png)", "", f"{figure.caption[0].upper() + figure.caption[1:]}. "
                  "[SVG](summary.svg)", ""]
    return _write_index_page(out_dir, lines)


def _other_reports(out_dir: Path, datasets: list[str]) -> list[str]:
    """Generated reports beside this one that come from other stores (a study's directory, a dataset
    run into another store): linked, never rewritten."""
    others = sorted(path.parent.name for path in out_dir.glob("*/README.md")
                    if path.parent.name not in datasets and path.read_text().startswith(GENERATED))
    if not others:
        return []
    return ["Other reports in this directory, from other stores (each has its own Reproduce commands): "
            + ", ".join(f"[{name}]({name}/README.md)" for name in others) + ".", ""]


def _write_index_page(out_dir: Path, lines: list[str]) -> Path:
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    legacy = out_dir / "index.md"  # this page's name before 2026-12-03: a generated one would go stale beside it
    if legacy.is_file() and legacy.read_text().startswith(GENERATED):
        legacy.unlink()
    return path


def _summary_entry(row: pd.Series) -> str:
    text = f"{fmt(row['asr'])} / {fmt(row['c_acc'])}"
    if row["n_done"] < row["n"]:
        text += f" ({row['n_done']}/{row['n']})"
    if row["n_done"] == 0:
        text = f"no finished cell (0/{row['n']})"
    return text
