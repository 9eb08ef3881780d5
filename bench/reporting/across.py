"""The report's "<focus> across setups" table: when a store holds several setups of one dataset
(another model, another stage learning rate), every configuration of the focus defense side by
side, so that a study reads its rows in one place instead of across the per-setup sections.

One row per (setup, configuration, attack with a trigger): the undefended model's C-ACC and ASR,
the defense's C-ACC and ASR, the selection metrics (bench/metrics/selection.py) and the detection
precision and recall, each as mean ± std over the seeds that finished. A configuration is labelled
by the fields that vary among the focus defense's configurations in the whole store, so the same
settings carry the same label in every setup.
"""
from __future__ import annotations

import math

from bench.reporting.collect import (
    ReportData,
    aggregate,
    canonical,
    has_trigger,
    lookup,
    status_of,
    variant_labels,
)
from bench.reporting.tables import fmt_stat, markdown_table

METRICS = ("undef_c_acc", "undef_asr", "c_acc", "asr", "sel_asr", "oracle_asr", "rand_asr", "sel_recall",
           "det_precision", "det_recall")
HEADER = ["setup", "configuration", "attack", "undefended C-ACC", "undefended ASR", "C-ACC", "ASR", "selection ASR",
          "oracle ASR", "random ASR", "sel. recall %", "det. precision %", "det. recall %", "seeds"]


def table(data: ReportData, focus: str) -> str | None:
    """The table, or None when fewer than two setups hold finished cells of ``focus``."""
    frame = data.cells
    cells = frame[(frame["defense"] == focus) & (frame["status"] == "done")] if not frame.empty else frame
    if cells.empty or cells["setup_key"].nunique() < 2:
        return None
    labels = variant_labels(focus, list(cells["defense_config"]))
    cells = cells.assign(configuration=[labels[canonical(c)] for c in cells["defense_config"]])
    stats = aggregate(cells, ["setup_key", "configuration", "attack_label"], METRICS)
    rows = []
    for setup in data.setups:
        mine = cells[cells["setup_key"] == setup.key]
        order = mine.sort_values("defense_sort", kind="stable")["configuration"].drop_duplicates()
        for configuration in order:
            for attack in setup.attacks:
                if not has_trigger(frame, attack):
                    continue
                record = lookup(stats, setup_key=setup.key, configuration=configuration, attack_label=attack)
                if status_of(record) not in ("done", "partial") or math.isnan(record["asr"]):
                    continue
                rows.append([setup.label, configuration, attack, *(fmt_stat(record, name) for name in METRICS),
                             ", ".join(str(s) for s in record["seeds"])])
    if not rows:
        return None
    return markdown_table(HEADER, rows, ["l", "l", "l"] + ["r"] * (len(HEADER) - 3))
