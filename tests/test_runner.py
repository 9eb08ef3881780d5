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
    store = tmp_path / "bench.sqlite"  # (listing a --plugin file: tests/test_faults.py, in-process)
    # As the README writes it: --plugin after the command's name.
    bench("run", "--plugin", str(plugin), *FAST, "--attacks", "badnets", "--defenses", "undefended,reserve-finetune",
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


def test_bad_input_through_the_module_exits_2_with_one_line():
    """The whole sweep of bad inputs runs in-process (tests/test_faults.py); this checks that
    ``python -m bench`` passes main's status on to the shell."""
    result = bench("run", "--dataset", "imagenet-9000", check=False)
    assert result.returncode == 2
    assert "unknown dataset 'imagenet-9000'; valid:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


HEAVY = ("torchvision", "timm", "sklearn", "matplotlib", "seaborn", "ray", "pandas", "scipy", "jenkspy", "bench.reporting")


def test_listing_help_and_errors_import_no_heavy_module():
    """`list`, `--help`, `results` and one-line errors start in `import torch` + a fraction of a
    second: registering the plugins must not import the heavy libraries, only using them does.
    (torchvision alone costs ~3 s: it imports torch._dynamo.)"""
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from bench.cli import main
        for argv in (["list"], ["run", "--dataset", "nope"], ["results", "--store", "/nonexistent/x.sqlite"],
                     ["run", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit:
                    pass
        print(sorted({{name.split(".")[0] if not name.startswith("bench.reporting") else "bench.reporting"
                      for name in sys.modules if name.startswith({HEAVY!r})}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "BENCH_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported at start-up: {result.stdout.strip()}"
