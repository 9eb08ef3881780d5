"""Executors run stages and cells; the runner hands them a plan and writes the store from
their callbacks (the runner stays the only writer). ``local`` runs one cell at a time in
this process. A distributed executor implements the same ``run`` contract.

Before computing a stage or cell an executor claims it (``Callbacks.claim``), so runners that
share a store never compute the same thing twice: a cell another live runner holds is left
to it, a stage another runner is training is waited for (after the other stages' work).
"""
from __future__ import annotations

import collections
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Protocol

from bench.cell import run_attack_stage, run_defense_cell
from bench.spec import CellSpec, StageSpec
from bench.workspace import Workspace


@dataclass
class Callbacks:
    stage_started: Callable[[StageSpec], None]
    stage_done: Callable[[StageSpec, dict], None]
    stage_failed: Callable[[StageSpec, str], None]
    cell_started: Callable[[CellSpec], None]
    cell_done: Callable[[CellSpec, dict], None]
    cell_failed: Callable[[CellSpec, str], None]
    # Sharing the store with other runners (the defaults suit a store of one's own).
    claim: Callable[[str, str], bool] = lambda item_id, kind: True     # (id, "stage" | "cell") -> taken?
    release: Callable[[str], None] = lambda item_id: None
    settled: Callable[[str, str], bool] = lambda item_id, kind: False  # finished by another runner meanwhile?
    log: Callable[[str], None] = lambda message: None


POLL_S = 2.0  # how often a runner looks again at a stage that another runner is training


# A plan: each stage with the cells that need it (the stage may already be cached).
Plan = list[tuple[StageSpec, list[CellSpec]]]


class Executor(Protocol):
    def run(self, plan: Plan, callbacks: Callbacks) -> None: ...


def describe_error(exc: BaseException) -> str:
    """One line for tables, then the traceback for whoever needs to debug it."""
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}"


class LocalExecutor:
    def __init__(self, workspace: Workspace, on_cell_finished: Callable[[], None] | None = None) -> None:
        self.workspace = workspace
        self.on_cell_finished = on_cell_finished

    def run(self, plan: Plan, callbacks: Callbacks) -> None:
        queue = collections.deque(plan)
        deferred_in_a_row = 0
        while queue:
            stage, cells = queue.popleft()
            if not self._run_stage(stage, cells, callbacks):
                # Another runner is training this stage: do the other stages' work first, then wait.
                queue.append((stage, cells))
                deferred_in_a_row += 1
                if deferred_in_a_row >= len(queue):
                    time.sleep(POLL_S)
                continue
            deferred_in_a_row = 0

    def _run_stage(self, stage: StageSpec, cells: list[CellSpec], callbacks: Callbacks) -> bool:
        """Run a stage and its cells; False (nothing done) when another runner holds the stage."""
        if callbacks.settled(stage.id, "stage"):  # failed in another runner during this run: not retried
            for cell in cells:
                self._finished()
            return True
        if not callbacks.claim(stage.id, "stage"):
            return False
        try:
            callbacks.stage_started(stage)
            try:
                stage_result = run_attack_stage(stage, self.workspace)
            except Exception as exc:  # KeyboardInterrupt propagates: the run stops, the store stays consistent
                error = describe_error(exc)
                callbacks.stage_failed(stage, error)
                for cell in cells:
                    if callbacks.claim(cell.id, "cell"):
                        callbacks.cell_started(cell)
                        callbacks.cell_failed(cell, f"attack stage failed: {error}")
                        callbacks.release(cell.id)
                    self._finished()
                return True
            callbacks.stage_done(stage, stage_result)
        finally:
            callbacks.release(stage.id)
        for cell in cells:
            self._run_cell(cell, callbacks)
        return True

    def _run_cell(self, cell: CellSpec, callbacks: Callbacks) -> None:
        if not callbacks.claim(cell.id, "cell"):
            callbacks.log(f"{cell.label()}: another runner is computing it; leaving it to that runner")
            self._finished()
            return
        try:
            if callbacks.settled(cell.id, "cell"):  # finished by another runner since this run planned it
                return
            callbacks.cell_started(cell)
            try:
                result = run_defense_cell(cell, self.workspace)
            except Exception as exc:
                callbacks.cell_failed(cell, describe_error(exc))
            else:
                callbacks.cell_done(cell, result)
        finally:
            callbacks.release(cell.id)
            self._finished()

    def _finished(self) -> None:
        if self.on_cell_finished is not None:
            self.on_cell_finished()


def _ray_stage(stage_json: dict, artifacts_root: str, device: str, plugins: list[str]) -> dict:
    workspace = _worker_workspace(artifacts_root, device, plugins)
    return run_attack_stage(StageSpec(**stage_json), workspace)


def _ray_cell(cell_json: dict, artifacts_root: str, device: str, plugins: list[str], stage_result: dict) -> dict:
    # stage_result is the finished stage task's value: passing its ref makes Ray schedule the
    # cell only after the stage (a task dependency, not polling).
    workspace = _worker_workspace(artifacts_root, device, plugins)
    return run_defense_cell(CellSpec.from_json(cell_json), workspace)


_worker_cache: dict[tuple, Workspace] = {}


def _worker_workspace(artifacts_root: str, device: str, plugins: list[str]) -> Workspace:
    """One workspace per worker process, so consecutive cells reuse device-resident data."""
    from pathlib import Path

    from bench.device import resolve_device
    from bench.registry import load_builtin_plugins, load_plugin_file

    key = (artifacts_root, device, tuple(plugins))
    if key not in _worker_cache:
        os.environ.setdefault("BENCH_PROGRESS", "0")
        load_builtin_plugins()
        for plugin in plugins:
            load_plugin_file(plugin)
        _worker_cache[key] = Workspace(Path(artifacts_root), resolve_device(device))
    return _worker_cache[key]


class RayExecutor:
    """Cells as Ray tasks: one GPU each where the cluster has GPUs (fractions allowed), CPUs
    otherwise. Each stage runs once; its cells depend on it. Workers write artifacts under
    ``artifacts_root``, which must be a path every node can reach; the runner process alone
    writes the store, from the results the tasks return. A task whose worker or node dies
    is retried once; a Python error in a cell is recorded, not retried."""

    def __init__(self, artifacts_root, address: str | None = None, gpus_per_cell: float | None = None,
                 cpus_per_cell: float = 1.0, plugins: list[str] | None = None,
                 on_cell_finished: Callable[[], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            from bench.errors import BenchError

            raise BenchError("--executor ray needs Ray: pip install '.[ray]' (or pip install ray)") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        if gpus_per_cell is None:
            gpus_per_cell = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.gpus_per_cell = gpus_per_cell
        self.cpus_per_cell = cpus_per_cell
        self.artifacts_root = str(artifacts_root)
        self.device = "cuda" if gpus_per_cell > 0 else "cpu"
        self.plugins = [str(p) for p in (plugins or [])]
        self.on_cell_finished = on_cell_finished

    def run(self, plan: Plan, callbacks: Callbacks) -> None:
        import dataclasses

        ray = self.ray
        options = dict(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell, max_retries=1, retry_exceptions=False)
        stage_task = ray.remote(_ray_stage).options(**options)
        cell_task = ray.remote(_ray_cell).options(**options)
        pending: dict = {}  # ref -> ("stage", spec) | ("cell", spec)
        for stage, cells in plan:
            # Claims are taken at submission and kept until the task ends; a stage another runner
            # is training is left to that runner, with its cells (run the grid again to pick up any left).
            if not callbacks.claim(stage.id, "stage"):
                callbacks.log(f"{stage.label()}: another runner is training this stage; its cells are left to it")
                for _ in cells:
                    self._finished()
                continue
            callbacks.stage_started(stage)
            stage_ref = stage_task.remote(dataclasses.asdict(stage), self.artifacts_root, self.device, self.plugins)
            pending[stage_ref] = ("stage", stage)
            for cell in cells:
                if not callbacks.claim(cell.id, "cell"):
                    callbacks.log(f"{cell.label()}: another runner is computing it; leaving it to that runner")
                    self._finished()
                    continue
                callbacks.cell_started(cell)
                ref = cell_task.remote(cell.to_json(), self.artifacts_root, self.device, self.plugins, stage_ref)
                pending[ref] = ("cell", cell)
        failed_stages: dict[str, str] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                kind, spec = pending.pop(ref)
                callbacks.release(spec.id)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    error = self._error(exc)
                    if kind == "stage":
                        failed_stages[spec.id] = error
                        callbacks.stage_failed(spec, error)
                    else:
                        stage_error = failed_stages.get(spec.stage.id)
                        callbacks.cell_failed(spec, f"attack stage failed: {stage_error}" if stage_error else error)
                        self._finished()
                    continue
                if kind == "stage":
                    callbacks.stage_done(spec, result)
                else:
                    callbacks.cell_done(spec, result)
                    self._finished()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _error(self, exc: Exception) -> str:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return describe_error(cause)
        return describe_error(exc)

    def _finished(self) -> None:
        if self.on_cell_finished is not None:
            self.on_cell_finished()
