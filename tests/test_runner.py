"""The runner through the CLI: plugins (file and entry point), resume after kill -9, errors."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--profile", "smoke", "-o", "train.epochs=3", "--no-report"]


def readme_example_defense() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- example-defense -->\s*```python\n(.*?)```\s*<!-- /example-defense -->", text, re.S)
    assert block, "README lost its example defense"
    return block.group(1)


def bench(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "BENCH_PROGRESS": "0", **(env or {})}, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"bench {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cells(store: Path) -> dict[str, tuple[str, float | None]]:
    with sqlite3.connect(store) as conn:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, finished FROM cells")}


def stage_spans(store: Path) -> dict[str, tuple[float, float]]:
    with sqlite3.connect(store) as conn:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, started, finished FROM stages WHERE status='done'")}


def test_readme_defense_runs_as_plugin_file_next_to_builtins(tmp_path):
    plugin = tmp_path / "reserve_finetune.py"
    plugin.write_text(readme_example_defense())
    listing = bench("--plugin", str(plugin), "list")
    assert "reserve-finetune" in listing.stdout
    store = tmp_path / "bench.sqlite"
    bench("--plugin", str(plugin), "run", *FAST, "--attacks", "badnets", "--defenses", "undefended,reserve-finetune",
          "--store", str(store))
    rows = cells(store)
    assert len(rows) == 2 and all(status == "done" for status, _ in rows.values())
    out = bench("results", "--store", str(store), "--format", "csv").stdout
    assert "reserve-finetune" in out and "undefended" in out


def test_defense_from_an_installed_entry_point(tmp_path):
    site = tmp_path / "site"
    package = site / "mydefense"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(readme_example_defense().replace('"reserve-finetune"', '"entry-finetune"'))
    dist = site / "mydefense-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mydefense\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bench.defenses]\nentry-finetune = mydefense\n")
    env = {"PYTHONPATH": str(site)}
    assert "entry-finetune" in bench("list", env=env).stdout
    store = tmp_path / "bench.sqlite"
    bench("run", *FAST, "--attacks", "badnets", "--defenses", "entry-finetune", "--store", str(store), env=env)
    assert [status for status, _ in cells(store).values()] == ["done"]


def test_kill_mid_grid_then_rerun_finishes_without_redoing(tmp_path):
    plugin = tmp_path / "reserve_finetune.py"
    plugin.write_text(readme_example_defense())
    store = tmp_path / "bench.sqlite"
    args = [sys.executable, "-m", "bench", "--plugin", str(plugin), "run", *FAST, "--attacks", "badnets,benign",
            "--defenses", "undefended,reserve-finetune", "--seeds", "0,1", "--store", str(store)]
    env = {**os.environ, "BENCH_PROGRESS": "0"}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done_before: dict[str, float] = {}
    while time.time() < deadline and process.poll() is None:
        if store.exists():
            try:
                done_before = {k: f for k, (s, f) in cells(store).items() if s == "done"}
            except sqlite3.OperationalError:
                done_before = {}
            if done_before:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the grid finished before it could be killed; make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    after_kill = cells(store)
    assert 0 < sum(s == "done" for s, _ in after_kill.values()) < 8
    stages_before = stage_spans(store)
    assert stages_before
    bench("--plugin", str(plugin), "run", *FAST, "--attacks", "badnets,benign", "--defenses", "undefended,reserve-finetune",
          "--seeds", "0,1", "--store", str(store))
    final = cells(store)
    assert len(final) == 8 and all(status == "done" for status, _ in final.values())
    for cell_id, finished in done_before.items():
        assert final[cell_id][1] == finished, "a finished cell was redone"
    stages_after = stage_spans(store)
    for stage_id, span in stages_before.items():  # reused from its artifact: it still says when it was trained
        assert stages_after[stage_id] == span, "a reused stage's wall clock was overwritten"
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_failing_defense_is_recorded_and_the_grid_goes_on(tmp_path):
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
                   "--store", str(store))
    assert "this defense always fails" in result.stdout + result.stderr
    with sqlite3.connect(store) as conn:
        rows = dict(conn.execute("SELECT defense, status FROM cells"))
        error = conn.execute("SELECT error FROM cells WHERE defense='broken'").fetchone()[0]
    assert rows == {"broken": "failed", "undefended": "done"}
    assert error.startswith("RuntimeError: this defense always fails")


@pytest.mark.parametrize("args,message", [
    (["run", "--dataset", "imagenet-9000"], "unknown dataset 'imagenet-9000'; valid:"),
    (["run", "--dataset", "synthetic", "--defenses", "nonee"], "unknown defense 'nonee'; valid:"),
    (["run", "--dataset", "synthetic", "-o", "defense.undefended.lr=1"], "has no field 'lr'"),
    (["run", "--dataset", "synthetic", "--seeds", "a"], "bad --seeds 'a'"),
    (["results", "--store", "/nonexistent/x.sqlite"], "no results store at /nonexistent/x.sqlite"),
    (["--plugin", "/nonexistent/p.py", "list"], "plugin file not found: /nonexistent/p.py"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(args, message):
    result = bench(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
