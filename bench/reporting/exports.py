"""results.csv (tidy: one row per cell and metric) and results.json, for people who make
their own plots. Values are written exactly as the store holds them."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd

from bench.reporting.collect import MAIN_METRICS, ReportData, aggregate

CSV_COLUMNS = ("dataset", "setup", "model", "profile", "attack", "attack_label", "defense", "defense_label", "seed",
               "status", "cell_id", "stage_id", "metric", "value", "error")


def _value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return json.dumps(value)


def _metric_items(cell: pd.Series) -> list[tuple[str, object]]:
    """The table's metrics always (empty when failed or undefined), then every other stored
    metric, then the timings in seconds."""
    metrics = cell["metrics"] or {}
    items = [(name, metrics.get(name)) for name in MAIN_METRICS]
    items += [(name, metrics[name]) for name in sorted(metrics) if name not in MAIN_METRICS]
    items += [(name, value) for name, value in sorted((cell["timings"] or {}).items())]
    return items


def setup_labels(data: ReportData) -> dict[str, str]:
    return {setup.key: setup.label for setup in data.setups}


def write_csv(data: ReportData, path: Path) -> Path:
    labels = setup_labels(data)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for _, cell in data.cells.iterrows():
            error = cell["error"].strip().splitlines()[0] if cell["error"].strip() else ""
            for metric, value in _metric_items(cell):
                writer.writerow([cell["dataset"], labels[cell["setup_key"]], cell["model"], cell["profile"], cell["attack"],
                                 cell["attack_label"], cell["defense"], cell["defense_label"], cell["seed"], cell["status"],
                                 cell["id"], cell["stage_id"], metric, _value(value), error])
    return path


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


CELL_FIELDS = ("id", "stage_id", "dataset", "model", "profile", "attack", "attack_label", "attack_config", "defense",
               "defense_label", "defense_config", "primary", "seed", "status", "error", "metrics", "timings",
               "environment", "details", "measured", "finished")


def write_json(data: ReportData, path: Path) -> Path:
    labels = setup_labels(data)
    cells = []
    for _, cell in data.cells.iterrows():
        record = {name: cell[name] for name in CELL_FIELDS}
        record["setup"] = labels[cell["setup_key"]]
        cells.append(_clean(record))
    summary = []
    for setup in data.setups:
        table = aggregate(setup.cells, ["defense_label", "attack_label"], data.metric_names)
        for record in table.to_dict("records"):
            summary.append(_clean({"setup": setup.label, **record}))
    payload = {
        "dataset": data.dataset,
        "setups": [{"label": s.label, **s.description} for s in data.setups],
        "cells": cells,
        "stages": [_clean(stage) for stage in data.stages.values()],
        # older cells of the same settings (before a plugin or core version change), not in the tables
        "superseded": [_clean({name: cell[name] for name in CELL_FIELDS if name in cell})
                       for _, cell in data.superseded.iterrows()],
        "summary": summary,
        "notes": "metrics in percent (DER in [0, 1]; reasr: max REASR over the scan's size bounds); summary: mean and "
                 "sample std over the done seeds",
    }
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
    return path
