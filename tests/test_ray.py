"""The Ray executor on a local Ray instance gives the same store as the local executor."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_runner import REPO, readme_example_defense

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra: pip install '.[ray]'")


def run(store: Path, plugin: Path, *extra: str) -> None:
    # One thread in both executors: Ray gives each 1-CPU task one thread, and the same
    # arithmetic order is what makes the two stores comparable number for number.
    env = {**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    result = subprocess.run([sys.executable, "-m", "bench", "--plugin", str(plugin), "run", "--dataset", "synthetic",
                             "--profile", "smoke", "-o", "train.epochs=2", "--attacks", "badnets",
                             "--defenses", "undefended,reserve-finetune", "--no-report", "--store", str(store), *extra],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def metrics_by_cell(store: Path) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(store) as conn:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, metrics FROM cells")}


def test_ray_executor_matches_local(tmp_path):
    plugin = tmp_path / "reserve_finetune.py"
    plugin.write_text(readme_example_defense())
    local, distributed = tmp_path / "local" / "bench.sqlite", tmp_path / "ray" / "bench.sqlite"
    run(local, plugin)
    run(distributed, plugin, "--executor", "ray")
    local_cells, ray_cells = metrics_by_cell(local), metrics_by_cell(distributed)
    assert len(local_cells) == 2
    assert all(status == "done" for status, _ in ray_cells.values())
    assert ray_cells == local_cells  # same cell ids, same metrics
    # Artifacts were written by the workers where the runner expects them.
    assert all((distributed.parent / cell_id / "result.json").is_file() for cell_id in ray_cells)
