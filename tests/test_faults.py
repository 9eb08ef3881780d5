"""Nothing silently wrong: bad input is refused before any work, damaged artifacts and data are
detected, interrupted and concurrent runs lose nothing and compute nothing twice."""
from __future__ import annotations

import gzip
import json
import shutil
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import artifacts
from bench.cli import main
from bench.errors import BenchError
from bench.store import ResultStore
from tests.test_runner import REPO, bench

FAST = ["--dataset", "synthetic", "--profile", "smoke", "-o", "train.epochs=1", "--no-report"]


def cli(capsys, *args: str) -> tuple[int, list[str], str]:
    """Run ``python -m bench`` in this process: (exit status, stderr lines, stdout)."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


# --- bad input: exit 2, one line, nothing run ---------------------------------------------------
def _gz_idx(path: Path, dims: list[int]) -> None:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    count = 1
    for d in dims:
        count *= d
    path.write_bytes(gzip.compress(header + bytes(count)))


def fashion_mnist_with_truncated_images(root: Path) -> Path:
    own = root / "fashion-mnist"
    own.mkdir(parents=True)
    _gz_idx(own / "train-images-idx3-ubyte.gz", [20, 28, 28])
    _gz_idx(own / "train-labels-idx1-ubyte.gz", [20])
    _gz_idx(own / "t10k-images-idx3-ubyte.gz", [10, 28, 28])
    _gz_idx(own / "t10k-labels-idx1-ubyte.gz", [10])
    damaged = own / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    return damaged


def _setup_case(name: str, tmp: Path, monkeypatch) -> tuple[list[str], str]:
    """(extra arguments, expected message) for the cases that need files."""
    store = tmp / "s.sqlite"
    one_cell = [*FAST, "--attacks", "badnets", "--defenses", "undefended"]
    if name == "store-is-a-directory":
        store.mkdir()
        return ["run", *one_cell, "--store", str(store)], f"results store {store} is a directory"
    if name == "store-is-a-text-file":
        store.write_text("these are my notes\n" * 100)
        return ["run", *one_cell, "--store", str(store)], f"{store} is not a usable results store"
    if name == "store-is-a-corrupt-sqlite-file":
        store.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 32)
        return ["results", "--store", str(store)], f"{store} is not a usable results store"
    if name == "bench-data-is-a-file":
        data = tmp / "data.txt"
        data.write_text("not a directory")
        monkeypatch.setenv("BENCH_DATA", str(data))
        return ["run", *one_cell, "--store", str(store)], f"BENCH_DATA={data} is not a directory"
    if name == "truncated-fashion-mnist":
        damaged = fashion_mnist_with_truncated_images(tmp / "data")
        monkeypatch.setenv("BENCH_DATA", str(tmp / "data"))
        return (["run", "--dataset", "fashion-mnist", "--profile", "smoke", "--attacks", "badnets", "--defenses",
                 "undefended", "--no-report", "--store", str(store)], f"{damaged} is unreadable")
    if name == "plugin-with-a-syntax-error":
        plugin = tmp / "broken.py"
        plugin.write_text("def oops(:\n")
        return ["--plugin", str(plugin), "list"], f"plugin file {plugin} failed to import"
    raise KeyError(name)


RUN = ["run", "--dataset", "synthetic", "--profile", "smoke"]
BAD_INPUT = [
    (["run", "--dataset", "imagenet-9000"], "unknown dataset 'imagenet-9000'; valid:"),
    ([*RUN, "--defenses", "nonee"], "unknown defense 'nonee'; valid:"),
    ([*RUN, "--attacks", "badnet"], "unknown attack 'badnet'; valid:"),
    ([*RUN, "--model", "resnet9000"], "unknown model 'resnet9000'; valid:"),
    ([*RUN[:3], "--profile", "fast"], "unknown profile 'fast'; valid:"),
    ([*RUN, "--device", "banana"], "unknown device 'banana'"),
    ([*RUN, "--executor", "banana"], "invalid choice: 'banana'"),
    ([*RUN, "--scan", "some"], "invalid choice: 'some'"),
    ([*RUN, "--attacks", ","], "bad --attacks ',': name at least one"),
    ([*RUN, "--defenses", ","], "bad --defenses ',': name at least one"),
    ([*RUN, "--seeds", ","], "bad --seeds ','"),
    ([*RUN, "--seeds", "a"], "bad --seeds 'a'"),
    ([*RUN, "-o", "defense.undefended.lr=1"], "has no field 'lr'"),
    ([*RUN, "-o", "train.epochs=0"], "invalid train.epochs=0: must be >= 1"),
    ([*RUN, "-o", "train.epochs=-1"], "invalid train.epochs=-1: must be >= 1"),
    ([*RUN, "-o", "finetune.epochs=0"], "invalid finetune.epochs=0: must be >= 1"),
    ([*RUN, "-o", "defense.ft.epochs=-3"], "invalid defense.ft.epochs=-3: must be >= 1"),
    ([*RUN, "-o", "train.batch_size=0"], "invalid train.batch_size=0: must be >= 1"),
    ([*RUN, "-o", "train.lr=-0.05"], "invalid train.lr=-0.05: must be > 0"),
    ([*RUN, "-o", "train.lr=nan"], "invalid train.lr=nan: must be a finite number > 0"),
    ([*RUN, "-o", "train.momentum=1"], "invalid train.momentum=1.0: must be in [0, 1)"),
    ([*RUN, "-o", "train.momentum=-0.1"], "invalid train.momentum=-0.1: must be in [0, 1)"),
    ([*RUN, "-o", "train.epochs=ten"], "bad override train.epochs='ten': expected an integer"),
    ([*RUN, "-o", "train.optimizer=rmsprop"], "expected one of sgd, adam"),
    ([*RUN, "-o", "epochs=3"], "the section must be one of"),
    ([*RUN, "-o", "train.epochs"], "expected section.name.field=value"),
    ([*RUN, "-o", "attack.badnets.poison_rate=1.5"], "invalid attack.badnets.poison_rate=1.5: must be in [0, 1]"),
    ([*RUN, "-o", "attack.badnets.target=10"], "invalid attack.badnets.target=10: synthetic has classes 0..9"),
    ([*RUN, "-o", "defense.none.lambda_low=0.95"], "need lambda_low < lambda_high"),
    ([*RUN, "-o", "defense.none.finetune_lr=0"], "invalid defense.none.finetune_lr=0.0: must be > 0"),
    ([*RUN, "-o", "defense.abl.isolation_epochs=12"], "isolation_epochs (12) must be fewer than the training recipe's 12"),
    ([*RUN, "-o", "defense.nad.betas=1:-1:1"], "invalid defense.nad.betas=(1.0, -1.0, 1.0): must be >= 0"),
    ([*RUN, "-o", "defense.ft.lr=1", "--attacks", "badnets", "--defenses", "undefended"], "not in the grid"),
    (["results", "--store", "/nonexistent/x.sqlite"], "no results store at /nonexistent/x.sqlite"),
    (["report", "--store", "/nonexistent/x.sqlite"], "no results store at /nonexistent/x.sqlite"),
    (["--plugin", "/nonexistent/p.py", "list"], "plugin file not found: /nonexistent/p.py"),
    (["list", "--plugin", "/nonexistent/p.py"], "plugin file not found: /nonexistent/p.py"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([*RUN, "-o", "metric.selection.samples=-1"], "invalid metric.selection.samples=-1: must be >= 0"),
    ([*RUN, "-o", "metric.features.samples=10,20"], "metric.features.samples takes one value, not a sweep"),
    ([*RUN, "-o", "metric.features.tsne=1"], "has no field 'tsne'"),
    ([*RUN, "-o", "metric.nope.samples=1"], "unknown metric 'nope'; valid: accuracy, detection, features, reasr, selection"),
    ([*RUN, "-o", "eval.oracle_samples=1"], "the section must be one of attack, defense, train, finetune, metric"),
    ([*RUN, "--focus", "nonee"], "unknown defense 'nonee'; valid:"),
]
FILE_CASES = ["store-is-a-directory", "store-is-a-text-file", "store-is-a-corrupt-sqlite-file", "bench-data-is-a-file",
              "truncated-fashion-mnist", "plugin-with-a-syntax-error"]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a[-2:]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, registries):
    store = ["--store", str(tmp_path / "s.sqlite")] if args[0] == "run" else []
    code, err, _ = cli(capsys, *args, *store)
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.sqlite").exists() or args[0] != "run", "a store was created for a refused run"


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_files_are_one_line_naming_the_path_and_exit_2(case, capsys, tmp_path, monkeypatch, registries):
    args, message = _setup_case(case, tmp_path, monkeypatch)
    code, err, _ = cli(capsys, *args)
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob(f"*{artifacts.TMP_MARK}*")), "a cell started"


def test_bad_inputs_cover_the_sweep():
    assert len(BAD_INPUT) + len(FILE_CASES) >= 25


# --- damaged artifacts are recomputed, never used ------------------------------------------------
@pytest.fixture
def scratch(tmp_path):
    """A workspace of its own (these tests damage its files) and a 1-epoch smoke grid."""
    from bench.grid import GridRequest, expand
    from bench.workspace import Workspace

    cells = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["ft", "fp"],
                               overrides=["train.epochs=1", "finetune.epochs=1"]))
    return Workspace(tmp_path / "runs", torch.device("cpu")), {cell.defense: cell for cell in cells}


def _zero_a_third(path: Path) -> None:
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = bytes(third)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_zero_a_third, _truncate], ids=["zeroed-third", "truncated"])
def test_damaged_stage_checkpoint_is_retrained_not_used(damage, scratch, capsys):
    """Before: a stage whose model.safetensors had a third of its bytes zeroed was loaded as is,
    and a defense on it was recorded as done with C-ACC 10, ASR 0 (a perfect-looking defense)."""
    from bench.cell import run_defense_cell

    ws, cells = scratch
    first = run_defense_cell(cells["ft"], ws)
    stage_dir = ws.stage_dir(cells["ft"].stage)
    trained_at = artifacts.read_result(stage_dir)["wall"]["started"]
    damage(stage_dir / "model.safetensors")
    capsys.readouterr()
    second = run_defense_cell(cells["fp"], ws)
    log = capsys.readouterr().err
    assert f"artifact {stage_dir.name} is not usable" in log and "model.safetensors" in log
    assert artifacts.read_result(stage_dir)["wall"]["started"] > trained_at, "the stage was not retrained"
    artifacts.verify(stage_dir)
    assert second["undefended"] == first["undefended"], "the retrained stage is the same deterministic model"


@pytest.mark.parametrize("damage", ["truncated-result-json", "no-hashes", "defense-file-edited"])
def test_damaged_cell_artifacts_are_recomputed(damage, scratch, capsys):
    from bench.cell import run_defense_cell

    ws, cells = scratch
    first = run_defense_cell(cells["ft"], ws)
    cell_dir = ws.root / first["id"]
    result_file = cell_dir / artifacts.RESULT_FILE
    if damage == "truncated-result-json":
        _truncate(result_file)
        reason = "result.json is unreadable"
    elif damage == "no-hashes":
        result = json.loads(result_file.read_text())
        del result[artifacts.FILES_KEY]
        result_file.write_text(json.dumps(result))
        reason = "lists no file hashes"
    else:
        (cell_dir / "history.json").write_text("[]")
        reason = "history.json does not match its recorded sha256"
    capsys.readouterr()
    again = run_defense_cell(cells["ft"], ws)
    log = capsys.readouterr().err
    assert f"artifact {cell_dir.name} is not usable" in log and reason in log
    assert again["wall"]["started"] > first["wall"]["started"], "reused instead of recomputed"
    assert again["metrics"] == first["metrics"]
    artifacts.verify(cell_dir)


def test_plan_redoes_a_done_cell_whose_artifacts_are_damaged(scratch, tmp_path):
    from bench.cell import run_defense_cell
    from bench.runner import plan_pending

    ws, cells = scratch
    store = ResultStore(tmp_path / "runs" / "bench.sqlite")
    for cell in cells.values():
        store.cell_running(cell)
        store.cell_done(cell.id, run_defense_cell(cell, ws))
    assert plan_pending(list(cells.values()), store) == []
    _truncate(ws.root / cells["fp"].id / "model.safetensors")
    plan = plan_pending(list(cells.values()), store)
    assert [[c.defense for c in group] for _, group in plan] == [["fp"]]


def test_an_exported_store_resumes_without_its_artifacts_but_a_plain_copy_does_not(scratch, tmp_path):
    """Before: a store committed without its artifacts (reports/fashion-mnist/bench.sqlite) read
    as 0 cells done where it was resumed, so "add seeds 1 and 2" recomputed seed 0 as well."""
    from bench.cell import run_defense_cell
    from bench.runner import plan_pending

    ws, cells = scratch
    store = ResultStore(tmp_path / "runs" / "bench.sqlite")
    for cell in cells.values():
        store.cell_running(cell)
        store.cell_done(cell.id, run_defense_cell(cell, ws))
    grid = list(cells.values())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(store.path, elsewhere / "copied.sqlite")  # a plain copy: the artifacts vanished
    assert len(plan_pending(grid, ResultStore(elsewhere / "copied.sqlite"))) == 1

    assert store.export(elsewhere / "exported.sqlite") == 2
    # Before: any reading command switched the committed copy to WAL, so `git status` showed it changed.
    committed = (elsewhere / "exported.sqlite").read_bytes()
    assert main(["results", "--store", str(elsewhere / "exported.sqlite"), "--format", "json"]) == 0
    assert (elsewhere / "exported.sqlite").read_bytes() == committed
    exported = ResultStore(elsewhere / "exported.sqlite")
    assert plan_pending(grid, exported) == []
    assert {row["artifacts"] for row in exported.cells()} == {"not kept"}
    assert [row["metrics"] for row in exported.cells()] == [row["metrics"] for row in store.cells()]

    (elsewhere / cells["fp"].id).mkdir()  # a damaged directory where none should be: recomputed
    assert [[c.defense for c in group] for _, group in plan_pending(grid, exported)] == [["fp"]]
    with pytest.raises(BenchError, match="another path"):
        store.export(store.path)


def test_export_keeps_only_report_files_that_match_their_recorded_hash(tmp_path):
    """A report file altered after its cell finished must not travel with an export as if it were the
    cell's; the model and the unlisted files stay behind."""
    from bench.artifacts import ArtifactWriter, report_files

    writer = ArtifactWriter(tmp_path / "c-1")
    for name, data in (("history.json", b"[]"), ("scores.png", b"png"), ("model.safetensors", b"weights")):
        (writer.tmp / name).write_bytes(data)
    writer.commit({"metrics": {}})
    assert report_files(tmp_path / "c-1") == {"history.json": b"[]", "scores.png": b"png"}
    (tmp_path / "c-1" / "scores.png").write_bytes(b"edited")
    (tmp_path / "c-1" / "late.png").write_bytes(b"not listed")
    assert report_files(tmp_path / "c-1") == {"history.json": b"[]"}
    assert report_files(tmp_path / "missing") == {}


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = platform.node()
    doomed = [tmp_path / f"c-a{artifacts.TMP_MARK}{host}-{dead.pid}", tmp_path / f"c-b{artifacts.TMP_MARK}{dead.pid}"]
    kept = [tmp_path / f"c-c{artifacts.TMP_MARK}{host}-{os.getpid()}",   # a live process of this host
            tmp_path / f"c-d{artifacts.TMP_MARK}elsewhere-{dead.pid}",    # another host's: cannot be checked here
            tmp_path / "c-e"]                                             # a finished directory
    for path in doomed + kept:
        path.mkdir()
    removed = artifacts.remove_stale_temporaries(tmp_path, lambda message: None)
    assert sorted(removed) == sorted(doomed)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in doomed)


# --- claims: runners that share a store ------------------------------------------------------------
def test_claims_exclude_live_owners_and_pass_from_dead_or_silent_ones(tmp_path):
    path = tmp_path / "bench.sqlite"
    first, second = ResultStore(path), ResultStore(path)
    assert first.claim("c-1", "cell") and first.claim("c-1", "cell"), "a claim is the holder's to renew"
    assert not second.claim("c-1", "cell") and second.owner("c-1") == f"{platform.node()}:{os.getpid()}"
    first.release("c-1")
    assert second.claim("c-1", "cell")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO claims VALUES ('c-dead', 'cell', ?, ?, 't1', ?, ?)", (platform.node(), dead.pid, now, now))
        conn.execute("INSERT INTO claims VALUES ('c-silent', 'cell', 'elsewhere', 1, 't2', ?, ?)", (now - 900, now - 900))
        conn.execute("INSERT INTO claims VALUES ('c-remote', 'cell', 'elsewhere', 1, 't3', ?, ?)", (now, now))
    assert first.claim("c-dead", "cell"), "the owner process is gone"
    assert first.claim("c-silent", "cell"), "the owner's heartbeat stopped long ago"
    assert not first.claim("c-remote", "cell"), "another host's runner with a fresh heartbeat"


def test_running_cells_of_a_gone_runner_read_as_interrupted(tmp_path):
    from bench.grid import GridRequest, expand

    cell = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["ft"]))[0]
    store = ResultStore(tmp_path / "bench.sqlite")
    store.cell_running(cell)
    store.claim(cell.id, "cell")
    assert [row["status"] for row in ResultStore(store.path).cells()] == ["running"]
    store.release(cell.id)  # what Ctrl-C, SIGTERM or a dead owner leaves
    assert [row["status"] for row in ResultStore(store.path).cells()] == ["interrupted"]


COUNTING_PLUGIN = """
import os, time

from attacks.badnets import BadNets
from bench import engine
from bench.defense import Defense, DefenseResult
from bench.registry import register_attack, register_defense


def note(what):
    with open(os.environ["BENCH_COUNT_FILE"], "a") as handle:
        handle.write(what + "\\n")


@register_attack("counted-badnets")
class CountedBadNets(BadNets):
    def prepare(self, train, ctx):
        note(f"stage seed{self.seed}")
        super().prepare(train, ctx)


class Counted(Defense):
    def run(self, ctx):
        note(f"cell {self.registered_name} seed{self.seed}")
        time.sleep(1.0)  # long enough that the two runners overlap
        recipe = ctx.finetune_recipe(epochs=1)
        return DefenseResult(ctx.model, history=engine.train(ctx.model, ctx.reserve, recipe, ctx.info, seed=self.seed))


for name in ("count-a", "count-b", "count-c"):
    register_defense(name)(type(name.replace("-", "_"), (Counted,), {}))
"""


def test_two_runners_on_one_store_compute_each_stage_and_cell_once(tmp_path):
    """Two `run` processes started together on one grid (2 stages x 3 cells): every stage is
    trained once and every cell computed once, the work split between them; both exit 0."""
    plugin = tmp_path / "counted.py"
    plugin.write_text(COUNTING_PLUGIN)
    counts = tmp_path / "counts.txt"
    store = tmp_path / "bench.sqlite"
    args = [sys.executable, "-m", "bench", "--plugin", str(plugin), "run", *FAST, "--attacks", "counted-badnets",
            "--defenses", "count-a,count-b,count-c", "--seeds", "0,1", "--store", str(store)]
    env = {**os.environ, "BENCH_PROGRESS": "0", "BENCH_COUNT_FILE": str(counts), "OMP_NUM_THREADS": "1"}
    runners = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [runner.communicate(timeout=300)[0] for runner in runners]
    assert [runner.returncode for runner in runners] == [0, 0], outputs
    done = sorted(counts.read_text().splitlines())
    expected = sorted([f"stage seed{s}" for s in (0, 1)] + [f"cell count-{d} seed{s}" for d in "abc" for s in (0, 1)])
    assert done == expected, f"computed twice or not at all: {done}"
    with sqlite3.connect(store) as conn:
        assert [row[0] for row in conn.execute("SELECT status FROM cells")] == ["done"] * 6
        assert conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0, "claims were not released"
    assert all("cells (0 already done" in output or "already done" in output for output in outputs)


SLOW_PLUGIN = """
import pathlib, time

from bench.defense import Defense
from bench.registry import register_defense


@register_defense("slow")
class Slow(Defense):
    def run(self, ctx):
        (ctx.artifact_dir / "partial.bin").write_bytes(b"half of something")
        pathlib.Path(ctx.artifact_dir.parent / "slow-started").touch()
        time.sleep(120)
        raise AssertionError("not interrupted")
"""


def test_sigterm_stops_like_ctrl_c_and_leaves_nothing_behind(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_PLUGIN)
    store = tmp_path / "bench.sqlite"
    started = tmp_path / "slow-started"
    process = subprocess.Popen([sys.executable, "-m", "bench", "--plugin", str(plugin), "run", *FAST, "--attacks",
                                "badnets", "--defenses", "undefended,slow", "--store", str(store)], cwd=REPO,
                               env={**os.environ, "BENCH_PROGRESS": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not started.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists(), process.communicate()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "interrupted: finished cells are saved" in err
    assert not list(tmp_path.glob(f"*{artifacts.TMP_MARK}*")), "the interrupted cell's temporary directory was left"
    rows = json.loads(bench("--plugin", str(plugin), "results", "--store", str(store), "--format", "json").stdout)
    assert sorted((row["defense"], row["status"]) for row in rows) == [("slow", "interrupted"), ("undefended", "done")]


# --- plugins --------------------------------------------------------------------------------------
PLUGIN_TEMPLATE = """
from bench.defense import Defense, DefenseResult
from bench.registry import register_defense


@register_defense("{name}")
class Plugin(Defense):
    def run(self, ctx):
        return DefenseResult(ctx.model, unchanged=True, details={{"variant": {variant}}})
"""


def test_plugin_files_with_the_same_name_in_two_folders_both_load(tmp_path, capsys, registries):
    """Before: the module name came from the file name alone, so the second file was silently skipped."""
    first, second = tmp_path / "a" / "defense.py", tmp_path / "b" / "defense.py"
    for path, name in ((first, "first-defense"), (second, "second-defense")):
        path.parent.mkdir()
        path.write_text(PLUGIN_TEMPLATE.format(name=name, variant=0))
    code, err, out = cli(capsys, "--plugin", str(first), "list", "--plugin", str(second), "--markdown")
    assert code == 0, err
    assert "`first-defense`" in out and "`second-defense`" in out


def test_editing_a_plugin_changes_its_cell_ids(tmp_path, registries):
    """Before: the same cell id, so results of the old code were reused silently."""
    from bench import registry
    from bench.grid import GridRequest, expand

    plugin = tmp_path / "mine.py"

    def cell_id(variant: int) -> str:
        plugin.write_text(PLUGIN_TEMPLATE.format(name="mine", variant=variant))
        # What a new process does: import the file afresh.
        sys.modules.pop(registry.plugin_module_name(plugin), None)
        registry.DEFENSES._entries.pop("mine", None)
        registry._source_hashes.clear()
        registry.load_plugin_file(plugin)
        return expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["mine"]))[0].id

    original, edited, reverted = cell_id(0), cell_id(1), cell_id(0)
    assert original != edited and original == reverted
    builtin = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["ft"]))[0]
    assert registry.source_hash(registry.DEFENSES.get("ft")) is None, "built-ins are identified by their version"
    assert builtin.id == expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["ft"]))[0].id


def test_a_failed_cell_makes_run_exit_1_with_a_summary(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(textwrap.dedent("""
        from bench.defense import Defense
        from bench.registry import register_defense

        @register_defense("broken")
        class Broken(Defense):
            def run(self, ctx):
                raise RuntimeError("this defense always fails")
    """))
    store = tmp_path / "bench.sqlite"
    result = bench("--plugin", str(plugin), "run", *FAST, "--attacks", "badnets", "--defenses", "broken,undefended",
                   "--store", str(store), check=False)
    assert result.returncode == 1, result.stderr
    assert "1 of 2 cells failed:" in result.stderr
    assert "x broken: RuntimeError: this defense always fails" in result.stderr
    assert "--retry-failed" in result.stderr
    with sqlite3.connect(store) as conn:
        assert dict(conn.execute("SELECT defense, status FROM cells")) == {"broken": "failed", "undefended": "done"}
    # The store records the plugin file; the report goes beside the store (never over the repository's
    # committed reports/), reloads the file by itself, and its Reproduce command names it.
    rows = json.loads(bench("results", "--store", str(store), "--format", "json").stdout)
    broken = next(row for row in rows if row["defense"] == "broken")
    assert [(p["kind"], p["via"], p["path"]) for p in broken["plugins"]] == [("defense", "file", str(plugin.resolve()))]
    committed = (REPO / "reports" / "README.md").stat().st_mtime_ns if (REPO / "reports" / "README.md").exists() else None
    bench("report", "--store", str(store), "--no-tsne")
    readme = (tmp_path / "reports" / "synthetic" / "README.md").read_text()
    assert ((REPO / "reports" / "README.md").stat().st_mtime_ns if committed else None) == committed
    command = next(line for line in readme.splitlines() if line.startswith("python -m bench run"))
    assert f"--plugin {plugin.resolve()}" in command
    # Run as printed, in a fresh shell, it re-creates the same cells.
    again = tmp_path / "again" / "bench.sqlite"
    subprocess.run(f"{command} --store {again} --no-report", shell=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "BENCH_PROGRESS": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    with sqlite3.connect(store) as first, sqlite3.connect(again) as second:
        assert sorted(first.execute("SELECT id FROM cells")) == sorted(second.execute("SELECT id FROM cells"))
    # Without the file, the report says what is missing instead of silently dropping it.
    plugin.unlink()
    bench("report", "--store", str(store), "--no-tsne")
    assert f"`{plugin.resolve()}` is missing here" in (tmp_path / "reports" / "synthetic" / "README.md").read_text()
