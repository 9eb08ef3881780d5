"""The grid runner: expand, skip finished cells, run the rest, keep going past failures,
summarise. Re-running the same command after a crash finishes the grid; several runners on one
store share the grid's work through claims (``bench.store``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import progress
from bench.artifacts import is_intact, remove_stale_temporaries
from bench.data.base import data_root
from bench.device import resolve_device
from bench.errors import BenchError
from bench.executors import Callbacks, LocalExecutor, Plan
from bench.grid import GridRequest, expand
from bench.spec import CellSpec, StageSpec
from bench.store import ResultStore
from bench.workspace import Workspace


@dataclass
class RunOptions:
    store: Path = Path("runs/bench.sqlite")
    device: str = "auto"
    executor: str = "local"
    retry_failed: bool = False
    artifacts: Path | None = None        # default: beside the store
    address: str | None = None           # Ray cluster address (auto, HOST:PORT); None starts a local one
    gpus_per_cell: float | None = None   # Ray: None = 1 when the cluster has GPUs, else 0
    plugins: list[str] = field(default_factory=list)


def plan_pending(cells: list[CellSpec], store: ResultStore, retry_failed: bool = False) -> Plan:
    """Cells not yet done (or whose artifacts vanished or are damaged, or that lack a metric the
    grid asks for), grouped under their stage, in grid order. A cell from an exported store
    (``ResultStore.export``) is done without artifacts, unless a damaged directory is there.
    Failed cells are retried only when asked: a deterministic failure would fail again."""
    plan: dict[str, tuple[StageSpec, list[CellSpec]]] = {}
    for cell in cells:
        status, measured, exported = store.cell_measured(cell.id)
        measured_all = all(measured.get(name) == key for name, key in cell.metric_keys().items())
        directory = store.artifacts_root / cell.id
        kept = is_intact(directory) or (exported and not directory.exists())
        done = status == "done" and measured_all and kept
        if status == "failed" and not retry_failed:
            continue
        if not done:
            plan.setdefault(cell.stage.id, (cell.stage, []))[1].append(cell)
    return list(plan.values())


def store_callbacks(store: ResultStore, log, run_started: float | None = None) -> Callbacks:
    def cell_failed(cell: CellSpec, error: str) -> None:
        store.cell_failed(cell.id, error)
        log(f"[red]failed[/red] {cell.label()}: {error.splitlines()[0]}")

    def cell_done(cell: CellSpec, result: dict) -> None:
        store.cell_done(cell.id, result)
        m = result["metrics"]
        log(f"done {cell.label()}: C-ACC {m['c_acc']}  ASR {m.get('asr')}  DER {m.get('der')}")

    def stage_failed(stage: StageSpec, error: str) -> None:
        store.stage_failed(stage.id, error)
        log(f"[red]attack stage failed[/red] {stage.label()}: {error.splitlines()[0]}")

    started = time.time() if run_started is None else run_started

    def settled(item_id: str, kind: str) -> bool:
        """Finished by another runner since this run began: failed (a stage), done or failed (a cell)."""
        row = store.stage_status(item_id) if kind == "stage" else store.cell_finished_at(item_id)
        if row is None or row[1] is None or row[1] < started:
            return False
        return row[0] == "failed" if kind == "stage" else row[0] in ("done", "failed")

    return Callbacks(
        stage_started=store.stage_running,
        stage_done=lambda stage, result: store.stage_done(stage.id, result),
        stage_failed=stage_failed,
        cell_started=store.cell_running,
        cell_done=cell_done,
        cell_failed=cell_failed,
        claim=store.claim,
        release=store.release,
        settled=settled,
        log=log,
    )


EXECUTORS = ("local", "ray")


def make_executor(options: RunOptions, workspace: Workspace, advance):
    if options.executor == "local":
        return LocalExecutor(workspace, on_cell_finished=advance)
    if options.executor == "ray":
        from bench.executors import RayExecutor

        return RayExecutor(workspace.root, address=options.address, gpus_per_cell=options.gpus_per_cell,
                           plugins=options.plugins, on_cell_finished=advance)
    raise BenchError(f"unknown executor {options.executor!r}; valid: {', '.join(EXECUTORS)}")


def run_grid(request: GridRequest, options: RunOptions) -> list[CellSpec]:
    """Run every unfinished cell of the grid; returns the grid's cells (finished or not)."""
    if options.executor not in EXECUTORS:
        raise BenchError(f"unknown executor {options.executor!r}; valid: {', '.join(EXECUTORS)}")
    cells = expand(request)
    data_root()  # a BENCH_DATA that is not a directory stops the run here, not inside every cell
    device = resolve_device(options.device)
    store = ResultStore(options.store, options.artifacts)
    store.record_catalog(catalog_entries())
    run_started = time.time()
    plan = plan_pending(cells, store, options.retry_failed)
    pending = sum(len(group) for _, group in plan)
    workspace = Workspace(store.artifacts_root, device)
    if pending and options.executor == "local":
        workspace.dataset(request.dataset)  # missing or damaged data: one error before any cell starts
    progress.log(f"grid: {len(cells)} cells ({len(cells) - pending} already done, {pending} to run) "
                 f"on {request.dataset}, profile {request.profile}, device {device}; store {store.path}")
    variant = cells[0].stage.data_variant if cells else ""
    if variant:
        from bench.registry import DATASETS

        progress.log(f"[yellow]{request.dataset}: {DATASETS.get(request.dataset)().info_for(variant).source}[/yellow]")
    remove_stale_temporaries(store.artifacts_root, progress.log)
    if pending:
        started = time.perf_counter()
        with store.heartbeats(), progress.task("grid", pending) as bar:
            executor = make_executor(options, workspace, lambda: bar.advance(1))
            executor.run(plan, store_callbacks(store, progress.log, run_started))
        progress.log(f"grid finished in {time.perf_counter() - started:.0f} s")
    return cells


def dry_run(request: GridRequest, options: RunOptions) -> str:
    """What ``run`` would do, without doing it: the grid expanded and checked (every bad name or
    override fails here as it would), and how much of it the store already holds."""
    cells = expand(request)
    stages = {cell.stage.id for cell in cells}
    pending = sum(len(group) for _, group in plan_pending(cells, ResultStore(options.store, options.artifacts, create=False),
                                                          options.retry_failed)) if options.store.is_file() else len(cells)
    attacks = list(dict.fromkeys(cell.stage.attack for cell in cells))
    defenses = list(dict.fromkeys(cell.defense for cell in cells))
    return (f"dry run: {len(cells)} cells ({len(stages)} attack stages) on {request.dataset}, profile {request.profile}: "
            f"{len(cells) - pending} already done in {options.store}, {pending} to run\n"
            f"  attacks: {', '.join(attacks)}\n  defenses: {', '.join(defenses)}\n  seeds: "
            f"{', '.join(map(str, dict.fromkeys(cell.stage.seed for cell in cells)))}")


def catalog_entries() -> list[tuple[str, str, dict]]:
    """What the report needs of every registered plugin (bench/store.py, ``catalog``)."""
    from bench.registry import ATTACKS, DATASETS, DEFENSES, METRICS, PROFILES

    entries = [("defense", name, cls.catalog()) for name, cls in DEFENSES.items()]
    entries += [("metric", name, cls.catalog()) for name, cls in METRICS.items()]
    entries += [("attack", name, {"has_trigger": bool(cls.has_trigger), "description": cls.description})
                for name, cls in ATTACKS.items()]
    entries += [("profile", name, {"description": profile.description}) for name, profile in PROFILES.items()]
    entries += [("dataset", name, {"description": cls.description, "variants": dict(cls.variants)})
                for name, cls in DATASETS.items()]
    return entries


def summary_rows(cells: list[CellSpec], store: ResultStore) -> list[dict]:
    wanted = {cell.id for cell in cells}
    return [row for row in store.cells() if row["id"] in wanted]
