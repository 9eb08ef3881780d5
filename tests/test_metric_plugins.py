"""A metric is one file: docs/examples/confidence.py, loaded with --plugin, adds its columns to
`results` and a section to the report with no other edit, and on a store that already holds the
finished cells it is measured on them without re-running any defense."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "confidence.py"


@pytest.fixture
def grid(smoke_cell, workspace, tmp_path):
    """`run` arguments for a smoke badnets row (undefended, ft) into a scratch store and artifact
    directory that start with the session's trained stage (trained once per session) and no cell."""
    stage = smoke_cell("badnets", "undefended")["stage_id"]
    artifacts = tmp_path / "artifacts"
    shutil.copytree(workspace.root / stage, artifacts / stage)
    store = tmp_path / "bench.sqlite"
    return ["run", "--dataset", "synthetic", "--profile", "smoke", "--attacks", "badnets", "--defenses", "undefended,ft",
            "--store", str(store), "--artifacts", str(artifacts), "--no-report"], store


def results(store: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert cli.main(["results", "--store", str(store), *extra]) == 0
    return capsys.readouterr().out


def test_a_metric_plugin_file_adds_columns_to_results_and_the_report(grid, registries, capsys, tmp_path):
    args, store = grid
    assert cli.main(args) == 0
    before = {row["defense"]: row for row in json.loads(results(store, capsys, "--format", "json"))}
    assert all("target_conf" not in row["metrics"] for row in before.values())

    assert cli.main(["--plugin", str(EXAMPLE), *args]) == 0
    log = capsys.readouterr()
    assert "measuring confidence on the finished cell" in log.out + log.err
    after = {row["defense"]: row for row in json.loads(results(store, capsys, "--format", "json"))}
    for defense, row in after.items():
        # the defense did not run again: the same result, with the metric's columns and key added
        assert row["id"] == before[defense]["id"] and row["timings"]["defense_s"] == before[defense]["timings"]["defense_s"]
        assert {k: v for k, v in row["metrics"].items() if not k.startswith("target_conf")} == before[defense]["metrics"]
        assert 0.0 <= row["metrics"]["target_conf_clean"] <= 100.0 and 0.0 <= row["metrics"]["target_conf"] <= 100.0
        assert set(row["measurements"]) == set(before[defense]["measurements"]) | {"confidence"}
    # The backdoored model gives its target far more probability on triggered images than on the same
    # images clean: measured over seeds 0-2 x 1-2 threads x AVX-512 / AVX2 kernels (Xeon), 96.10-97.91%
    # against 1.39-1.74%, a gap of 94.4-96.5 points; the bound leaves 44.
    undefended = after["undefended"]["metrics"]
    assert undefended["target_conf"] > undefended["target_conf_clean"] + 50
    assert "target_conf" in results(store, capsys, "--format", "csv").splitlines()[0]
    assert "target confidence" in results(store, capsys, "--metrics", "accuracy,confidence")

    assert cli.main(["report", "--store", str(store), "--out", str(tmp_path / "reports"), "--no-tsne"]) == 0
    readme = (tmp_path / "reports" / "synthetic" / "README.md").read_text()
    section = readme.split("## Confidence in the target", 1)[1].split("\n## ", 1)[0]
    assert "| defense | attack | target confidence (%) | clean target confidence (%) |" in section
    assert "| ft | badnets |" in section and "| undefended | badnets |" in section


def test_a_second_run_with_the_same_metric_measures_nothing(grid, registries, capsys):
    args, store = grid
    assert cli.main(["--plugin", str(EXAMPLE), *args]) == 0
    capsys.readouterr()
    assert cli.main(["--plugin", str(EXAMPLE), *args]) == 0
    log = capsys.readouterr()
    assert "measuring" not in log.out + log.err and "(2 already done, 0 to run)" in log.out + log.err


def test_an_unknown_metric_in_results_is_one_line(grid, capsys):
    args, store = grid
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(["results", "--store", str(store), "--metrics", "nope"]) == 2
    assert "unknown metric 'nope' in --metrics; the store records: accuracy, detection" in capsys.readouterr().err
