"""Every example that ``--help`` prints runs as printed.

``run`` examples get ``--dry-run`` appended: it expands and checks the grid exactly as the run
would (names, overrides, sweeps, plugin files, recipes) and stops before training, so a
three-hour example is checked in a second. ``results``, ``export`` and ``report`` examples run for real,
in a scratch directory whose ``runs/bench.sqlite`` holds one finished smoke cell.
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from bench import cli
from bench.runner import catalog_entries
from bench.spec import CellSpec
from bench.store import ResultStore
from tests.bounds import SEED

ROOT = Path(__file__).resolve().parents[1]


def examples(epilog: str) -> list[list[str]]:
    lines = [line.split("  #")[0].strip() for line in epilog.splitlines() if line.strip().startswith("python -m bench")]
    return [shlex.split(line)[3:] for line in lines]


RUN_EXAMPLES = examples(cli.RUN_EPILOG)
STORE_EXAMPLES = examples(cli.REPORT_EPILOG) + examples(cli.RESULTS_EPILOG) + examples(cli.EXPORT_EPILOG)


def test_every_command_with_examples_has_some():
    assert len(RUN_EXAMPLES) >= 6 and len(STORE_EXAMPLES) >= 4


@pytest.mark.parametrize("args", RUN_EXAMPLES, ids=[" ".join(a) or "run" for a in RUN_EXAMPLES])
def test_run_examples_expand_as_printed(args, capsys, monkeypatch, registries):
    monkeypatch.chdir(ROOT)  # the examples' relative paths (docs/examples/...) are from the repository root
    code = cli.main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("dry run: ") and " cells (" in out, out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, smoke_cell, workspace):
    """A scratch directory laid out as the repository (runs/bench.sqlite holding one real badnets x
    undefended smoke cell, and the published-outcome reference the examples name)."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "docs" / "reference", root / "docs" / "reference")
    result = smoke_cell("badnets", "undefended")
    spec = CellSpec.from_json(result["spec"])
    store = ResultStore(root / "runs" / "bench.sqlite", workspace.root)
    store.record_catalog(catalog_entries())  # what a run records
    store.stage_running(spec.stage)
    store.stage_done(spec.stage.id, json.loads((workspace.root / spec.stage.id / "result.json").read_text()))
    store.cell_running(spec)
    store.cell_done(spec.id, result)
    return root


@pytest.mark.parametrize("args", STORE_EXAMPLES, ids=[" ".join(a) for a in STORE_EXAMPLES])
def test_report_and_results_examples_run_as_printed(args, store_dir, capsys, monkeypatch):
    monkeypatch.chdir(store_dir)
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code in (0, None), err
    if args[0] == "report":
        out_dir = Path(args[args.index("--reports") + 1]) if "--reports" in args else Path("runs/reports")
        readme = (out_dir / "synthetic" / "README.md").read_text()
        focus = args[args.index("--focus") + 1] if "--focus" in args else "none"
        assert "## Results" in readme
        if focus != "none":
            assert f"`{focus}` has no cells here" in readme  # the store has only the undefended cell
    if "json" in args:
        assert json.loads(out)[0]["defense"] == "undefended"
    if args[0] == "export":
        copy = ResultStore(args[args.index("--to") + 1], create=False)
        assert [(row["defense"], row["artifacts"]) for row in copy.cells()] == [("undefended", "not kept")]


def test_dry_run_counts_what_the_store_already_holds(store_dir, capsys, monkeypatch):
    monkeypatch.chdir(store_dir)
    code = cli.main(["run", "--dataset", "synthetic", "--profile", "smoke", "--attacks", "badnets",
                     "--defenses", "undefended,ft", "--seeds", str(SEED), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 cells (1 attack stages)" in out and "1 already done" in out and "1 to run" in out
