"""From the results store to one tidy frame per dataset: one row per cell, with labels.

Everything a report shows is derived here from ``ResultStore`` rows (and nothing else),
so tables, figures and exports agree by construction.

A dataset's cells can come from several *setups* (model, profile, training recipes):
results of different setups are never averaged together. Within a setup, an attack or
defense that appears with several configurations (a sweep) becomes several *variants*,
labelled by the fields that differ, e.g. ``none (max_reset_fraction=0.1)``.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.reporting.catalog import REFERENCE, Catalog
from bench.store import ResultStore

# The protocol's metrics (bench/metrics/accuracy.py): every report's main table.
MAIN_METRICS = ("c_acc", "asr", "ra", "der")
TIMING_KEYS = ("attack_s", "defense_s", "metrics_s")


def _number(value: Any) -> float:
    """Store values as floats for arithmetic; None (metric not defined) becomes NaN."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ":".join(short(v) for v in value)
    return str(value)


def variant_labels(name: str, configs: list[dict]) -> dict[str, str]:
    """canonical config -> label; the bare name when the plugin has only one configuration."""
    unique = {canonical(c): c for c in configs}
    if len(unique) == 1:
        return {key: name for key in unique}
    varying = sorted(k for k in set().union(*unique.values())
                     if len({canonical(c.get(k)) for c in unique.values()}) > 1)
    return {key: f"{name} ({', '.join(f'{k}={short(c.get(k))}' for k in varying)})" for key, c in unique.items()}


def varying_fields(configs: list[dict]) -> list[str]:
    unique = {canonical(c): c for c in configs}
    if len(unique) < 2:
        return []
    return sorted(k for k in set().union(*unique.values())
                  if len({canonical(c.get(k)) for c in unique.values()}) > 1)


@dataclass
class Setup:
    key: str
    label: str
    cells: pd.DataFrame
    description: dict = field(default_factory=dict)

    @property
    def attacks(self) -> list[str]:
        return ordered(self.cells, "attack_label")

    @property
    def defenses(self) -> list[str]:
        return ordered(self.cells, "defense_label")

    def primary(self) -> pd.DataFrame:
        """One variant per defense (its default configuration when present): for per-defense figures."""
        return self.cells[self.cells["primary"]]


class ItemFiles:
    """Where the report reads a stage's or cell's files: its artifact directory when it is on disk,
    else what ``export`` kept of it in the store (bench/store.py), written out once to a temporary
    directory that goes when this object does."""

    def __init__(self, root: Path, store: ResultStore | None = None) -> None:
        self.root = Path(root)
        self._store = store
        self._kept = store.kept_ids() if store is not None else set()
        self._scratch: Path | None = None

    def available(self, item_id: str) -> bool:
        return (self.root / item_id).is_dir() or item_id in self._kept

    def directory(self, item_id: str) -> Path:
        """The directory holding the item's files (it may not exist: the readers say what is missing)."""
        on_disk = self.root / item_id
        if on_disk.is_dir() or item_id not in self._kept:
            return on_disk
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="bench-report-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        written = self._scratch / item_id
        if not written.is_dir():
            written.mkdir()
            for name, data in self._store.kept_files(item_id).items():
                (written / name).write_bytes(data)
        return written


@dataclass
class ReportData:
    dataset: str
    cells: pd.DataFrame
    stages: dict[str, dict]
    setups: list[Setup]
    files: ItemFiles
    catalog: Catalog = field(default_factory=Catalog)
    superseded: pd.DataFrame = field(default_factory=pd.DataFrame)  # older runs of the same settings

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every column the cells hold: the catalog's, in its order, then any other a cell stored."""
        declared = tuple(self.catalog.columns)
        found = sorted({name for metrics in self.cells.get("metrics", []) for name in (metrics or {})} - set(declared))
        return declared + tuple(found)

    @property
    def main(self) -> Setup | None:
        return self.setups[0] if self.setups else None


def ordered(frame: pd.DataFrame, column: str) -> list[str]:
    """Labels in display order: the reference defense first, then by name and variant."""
    if frame.empty:
        return []
    sort_col = "defense_sort" if column == "defense_label" else "attack_sort"
    keys = frame[[column, sort_col]].drop_duplicates(column)
    return [row[column] for _, row in keys.sort_values(sort_col, kind="stable").iterrows()]


def _sort_key(name: str, config: dict, varying: list[str], reference: bool) -> str:
    parts = [("0" if reference else "1") + name]
    for key in varying:
        value = config.get(key)
        parts.append(f"{value:020.8f}" if isinstance(value, (int, float)) and not isinstance(value, bool)
                     and value >= 0 else canonical(value))
    return "\x00".join(parts)


def _setup_fields(config: dict) -> dict:
    return {"model": config.get("model"), "profile": config.get("profile"), "train": config.get("train"),
            "finetune": config.get("finetune"), "data_variant": config.get("data_variant") or ""}


def load(store: ResultStore, dataset: str) -> ReportData:
    catalog = Catalog.from_store(store)
    cells = store.cells(dataset=dataset)
    names = list(catalog.columns)
    names += sorted({name for cell in cells for name in (cell.get("metrics") or {})} - set(names))
    stages = {stage["id"]: stage for stage in store.stages(dataset=dataset)}
    rows = []
    for cell in cells:
        config = cell.get("config") or {}
        metrics = cell.get("metrics") or {}
        timings = cell.get("timings") or {}
        stage = stages.get(cell["stage_id"]) or {}
        stage_metrics = stage.get("metrics") or {}
        row = {
            "id": cell["id"], "stage_id": cell["stage_id"], "dataset": cell["dataset"], "model": cell["model"],
            "profile": cell["profile"], "attack": cell["attack"], "defense": cell["defense"], "seed": int(cell["seed"]),
            "status": cell["status"], "error": cell.get("error") or "", "finished": _number(cell.get("finished")),
            "started": _number(cell.get("started")),
            "attack_config": config.get("attack_config") or {}, "defense_config": config.get("defense_config") or {},
            "setup_key": canonical(_setup_fields(config)), "setup_fields": _setup_fields(config),
            # as stored (None for a failed cell), so the JSON export is the store's own record
            "metrics": cell.get("metrics"), "timings": cell.get("timings"), "environment": cell.get("environment"),
            "details": cell.get("details"), "plugins": cell.get("plugins") or [],
            # metric name -> the details it stored (bench/metric.py, ``Measurement.details``)
            "measured": {name: entry.get("details") for name, entry in (cell.get("measurements") or {}).items()},
            "user_set": config.get("user_set"),  # None in stores written before it was recorded
            "stage_status": stage.get("status"), "stage_s": _number((stage.get("timings") or {}).get("total_s")),
            "undef_c_acc": _number(stage_metrics.get("c_acc")), "undef_asr": _number(stage_metrics.get("asr")),
            "undef_ra": _number(stage_metrics.get("ra")), "poison_rate": _number(stage_metrics.get("poison_rate")),
            "poisoned": _number(stage_metrics.get("poisoned")),
        }
        for name in names:
            row[name] = _number(metrics.get(name))
        for name in TIMING_KEYS:
            row[name] = _number(timings.get(name))
        rows.append(row)
    frame = pd.DataFrame(rows)
    superseded = frame.iloc[0:0]
    setups: list[Setup] = []
    if not frame.empty:
        frame, superseded = _latest(frame)
        display_order = ["attack_sort", "defense_sort", "seed", "id"]
        for key, group in frame.groupby("setup_key", sort=False):
            cells = _label(group.copy()).sort_values(display_order, kind="stable")
            setups.append(Setup(key=key, label="", cells=cells, description=group.iloc[0]["setup_fields"]))
        setups.sort(key=lambda s: (-(s.cells["status"] == "done").sum(), -s.cells["finished"].fillna(0).max()))
        _name_setups(setups)
        frame = pd.concat([s.cells for s in setups])
    return ReportData(dataset=dataset, cells=frame, stages=stages, setups=setups,
                      files=ItemFiles(store.artifacts_root, store), catalog=catalog, superseded=superseded)


def _latest(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the most recently started cell of each (setup, attack, defense, configurations, seed).

    The same settings get a new cell id when a plugin's or the core's version changes; the
    old result stays in the store but is superseded, and must not be averaged in as an
    extra seed."""
    identity = frame.apply(lambda r: canonical([r["setup_key"], r["attack"], r["attack_config"], r["defense"],
                                                 r["defense_config"], r["seed"]]), axis=1)
    order = frame.assign(_identity=identity, _started=frame["started"].fillna(-1.0))
    order = order.sort_values(["_identity", "_started", "id"], kind="stable")
    latest = ~order.duplicated("_identity", keep="last")
    keep = order[latest].drop(columns=["_identity", "_started"])
    return keep, order[~latest].drop(columns=["_identity", "_started"])


def _label(group: pd.DataFrame) -> pd.DataFrame:
    """Variant labels, display order and primary defense variants of one setup (the variant the
    user set no defense field for, as recorded in the store).

    A defense's configuration may legitimately differ between attacks (per-attack defaults,
    e.g. NONE's natural preset on ``benign``), so only fields that take several values for
    the same attack make variants (a sweep); labels name those fields."""
    labels, sorts = {}, {}
    for name, sub in group.groupby("attack"):
        configs = list(sub["attack_config"])
        names, varying = variant_labels(name, configs), varying_fields(configs)
        for config in configs:
            key = canonical(config)
            labels[(name, key)] = names[key]
            sorts[(name, key)] = _sort_key(name, config, varying, False)
    keys = [(n, canonical(c)) for n, c in zip(group["attack"], group["attack_config"])]
    group["attack_label"] = [labels[k] for k in keys]
    group["attack_sort"] = [sorts[k] for k in keys]
    swept = {name: swept_fields(group, name) for name in group["defense"].unique()}
    group["defense_label"] = [
        name + (f" ({', '.join(f'{k}={short(c.get(k))}' for k in swept[name])})" if swept[name] else "")
        for name, c in zip(group["defense"], group["defense_config"])]
    group["defense_sort"] = [_sort_key(name, c, swept[name], name == REFERENCE)
                             for name, c in zip(group["defense"], group["defense_config"])]
    primary = {}
    for (name, attack), sub in group.groupby(["defense", "attack"]):
        chosen = None
        for label, variant in sub.groupby("defense_label"):
            if all(user_set is not None and not user_set.get("defense") for user_set in variant["user_set"]):
                chosen = label  # the configuration the grid gives when the user sets nothing
        if chosen is None:  # no default variant: the one with most cells, then the first in order
            chosen = min((-len(v), v.iloc[0]["defense_sort"], label) for label, v in sub.groupby("defense_label"))[2]
        primary[(name, attack)] = chosen
    group["primary"] = [primary[(d, a)] == label for d, a, label in zip(group["defense"], group["attack"],
                                                                         group["defense_label"])]
    return group


def swept_fields(frame: pd.DataFrame, defense: str) -> list[str]:
    """Fields of a defense's configuration that take several values for the same attack (a sweep)."""
    sub = frame[frame["defense"] == defense]
    fields: set[str] = set()
    for _, per_attack in sub.groupby("attack"):
        fields |= set(varying_fields(list(per_attack["defense_config"])))
    return sorted(fields)


def _name_setups(setups: list[Setup]) -> None:
    for setup in setups:
        d = setup.description
        setup.label = f"{d['model']}, {d['profile']} profile" + (f", {d['data_variant']} data" if d.get("data_variant") else "")
    by_label: dict[str, list[Setup]] = {}
    for setup in setups:
        by_label.setdefault(setup.label, []).append(setup)
    for same in by_label.values():
        if len(same) < 2:
            continue
        for section in ("train", "finetune"):
            varying = varying_fields([s.description.get(section) or {} for s in same])
            for setup in same:
                values = setup.description.get(section) or {}
                if varying:
                    setup.label += ", " + ", ".join(f"{section}.{k}={short(values.get(k))}" for k in varying)


def aggregate(frame: pd.DataFrame, by: list[str], metrics: tuple[str, ...] = MAIN_METRICS) -> pd.DataFrame:
    """Mean and sample std (ddof=1) over seeds of the done cells, with how many cells were
    done / failed / still running, so that a partly failed entry is shown as such."""
    records = []
    for keys, group in frame.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        done = group[group["status"] == "done"]
        record = dict(zip(by, keys))
        record.update(n=len(group), n_done=len(done), n_failed=int((group["status"] == "failed").sum()),
                      n_running=int(group["status"].isin(("running", "interrupted")).sum()), seeds=sorted(group["seed"].unique().tolist()))
        for name in metrics:
            values = done[name].dropna()
            record[name] = float(values.mean()) if len(values) else math.nan
            record[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            record[f"{name}_n"] = len(values)
        records.append(record)
    return pd.DataFrame(records)


def status_of(record: dict | pd.Series | None) -> str:
    """done | partial | failed | running | missing for one aggregated entry."""
    if record is None:
        return "missing"
    if record["n_done"] == record["n"]:
        return "done"
    if record["n_done"] > 0:
        return "partial"
    if record["n_failed"] > 0:
        return "failed"
    return "running"


def lookup(table: pd.DataFrame, **keys) -> pd.Series | None:
    if table.empty:
        return None
    mask = pd.Series(True, index=table.index)
    for key, value in keys.items():
        mask &= table[key] == value
    hits = table[mask]
    return hits.iloc[0] if len(hits) else None


def has_trigger(frame: pd.DataFrame, attack_label: str) -> bool:
    """Whether ASR is defined for the attack (``benign`` has no trigger): whether any of its cells
    or stages measured an ASR (an attack with a trigger always has one)."""
    sub = frame[frame["attack_label"] == attack_label]
    return bool(sub["asr"].notna().any() or sub["undef_asr"].notna().any())


def figure_seed(cells: pd.DataFrame, files: ItemFiles) -> int:
    """The seed a per-cell figure is drawn from: the lowest seed with files of these cells (their
    artifact directories, or what an export kept of them), else the lowest seed. A store resumed
    from an exported copy (bench/store.py, ``export``) holds older seeds' results without their
    artifacts, and an older copy kept none of their files."""
    seeds = sorted(int(seed) for seed in cells["seed"].unique())
    for seed in seeds:
        if any(files.available(cell_id) for cell_id in cells.loc[cells["seed"] == seed, "id"]):
            return seed
    return seeds[0]
