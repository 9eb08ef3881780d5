"""benchmarks/grid_cost.py turns the wall times a store recorded into the grid's cost: known
seconds in, exactly their sums, medians and projections out (nothing is timed here)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bench.grid import GridRequest, expand
from bench.registry import ATTACKS, DEFENSES
from bench.spec import CellSpec
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_cost():
    spec = importlib.util.spec_from_file_location("grid_cost", ROOT / "benchmarks" / "grid_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grid_cost"] = module
    spec.loader.exec_module(module)
    return module


# stage seconds per attack; cell seconds (defense, eval, scan) per (attack, defense)
STAGE_S = {"badnets": 100.0, "blend": 300.0}
CELL_S = {("badnets", "undefended"): (0.0, 2.0, 0.0), ("badnets", "ft"): (40.0, 2.0, 0.0),
          ("blend", "ft"): (60.0, 2.0, 0.0), ("blend", "none"): (120.0, 2.0, 18.0)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ResultStore(tmp_path_factory.mktemp("cost") / "bench.sqlite")
    for attack, seconds in STAGE_S.items():
        stage = expand(GridRequest("synthetic", "smoke", attacks=[attack], defenses=["undefended"]))[0].stage
        store.stage_running(stage)
        store.stage_done(stage.id, {"metrics": {}, "timings": {"total_s": seconds}})
        for (cell_attack, defense), (defense_s, eval_s, scan_s) in CELL_S.items():
            if cell_attack == attack:
                cell = CellSpec(stage, defense, {})
                store.cell_running(cell)
                store.cell_done(cell.id, {"metrics": {}, "timings": {"defense_s": defense_s, "accuracy_s": eval_s,
                                                                     "reasr_s": scan_s, "metrics_s": eval_s + scan_s}})
    return store


def test_measured_projected_and_per_cell_table(grid_cost, store):
    lines = grid_cost.report(store, "synthetic", "smoke")
    text = "\n".join(lines)
    measured = sum(STAGE_S.values()) + sum(sum(t) for t in CELL_S.values())  # 400 + 246 s
    ft_median = 52.0  # median of 42 and 62
    others = len(ATTACKS.names()) - len(STAGE_S)
    # unmeasured stages take the median stage (200 s); unmeasured cells their defense's median
    projected = others * 200.0 + (len(ATTACKS.names()) - 2) * ft_median + (len(ATTACKS.names()) - 1) * (2.0 + 140.0)
    assert f"- measured cells and stages: {grid_cost.minutes(measured)}" in lines
    assert f"- projected for the rest (median of the same defense / stage): {grid_cost.minutes(projected)}" in lines
    assert f"- total: **{grid_cost.minutes(measured + projected)}**" in lines
    defenses = DEFENSES.names()
    header = "| attack | stage | " + " | ".join(defenses) + " |"
    assert header in lines
    blend_row = [line for line in lines if line.startswith("| blend |")][-1].strip("|").split("|")  # the per-cell table's
    cells = dict(zip(["attack", "stage", *defenses], (c.strip() for c in blend_row)))
    assert cells["stage"] == "5.0 min" and cells["ft"] == "1.0 min" and cells["none"] == "2.3 min"
    assert cells["undefended"] == "—"  # never run on blend: not invented
    assert "never measured, not counted" in text  # e.g. defenses run on no attack at all


def test_wall_clock_of_one_run_spans_first_start_to_last_finish(grid_cost, store):
    rows = grid_cost.profile_rows(store, "synthetic", "smoke")
    expected = max(r["finished"] for r in rows) - min(r["started"] for r in rows)
    (start, finish), = grid_cost.runs(rows)
    assert finish - start == pytest.approx(expected)
    assert grid_cost.profile_rows(store, "synthetic", "quick") == []  # no rows of that profile
    assert any(line.startswith("- wall clock in the store") and "in 1 run(s)" in line for line in grid_cost.report(store, "synthetic", "smoke"))


def test_a_resumed_grid_is_two_runs_and_the_pause_is_not_counted(grid_cost):
    hour = 3600.0
    rows = [{"started": 0.0, "finished": 100.0}, {"started": 90.0, "finished": 200.0},  # overlapping (Ray)
            {"started": 200.0 + grid_cost.PAUSE_S, "finished": 300.0 + grid_cost.PAUSE_S},  # a short gap: same run
            {"started": 5 * hour, "finished": 5 * hour + 50.0},  # resumed hours later
            {"started": 5 * hour + 60.0, "finished": None}]  # running or failed without a finish: not counted
    assert grid_cost.runs(rows) == [(0.0, 300.0 + grid_cost.PAUSE_S), (5 * hour, 5 * hour + 50.0)]
