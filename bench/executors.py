"""Executors run stages and cells; the runner hands them a plan and writes the store from
their callbacks (the runner stays the only writer). ``local`` runs one cell at a time in
this process. A distributed executor implements the same ``run`` contract."""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable, Protocol

from bench.cell import CellSpec, StageSpec, Workspace, run_attack_stage, run_defense_cell


@dataclass
class Callbacks:
    stage_started: Callable[[StageSpec], None]
    stage_done: Callable[[StageSpec, dict], None]
    stage_failed: Callable[[StageSpec, str], None]
    cell_started: Callable[[CellSpec], None]
    cell_done: Callable[[CellSpec, dict], None]
    cell_failed: Callable[[CellSpec, str], None]


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
        for stage, cells in plan:
            callbacks.stage_started(stage)
            try:
                stage_result = run_attack_stage(stage, self.workspace)
            except Exception as exc:  # KeyboardInterrupt propagates: the run stops, the store stays consistent
                error = describe_error(exc)
                callbacks.stage_failed(stage, error)
                for cell in cells:
                    callbacks.cell_started(cell)
                    callbacks.cell_failed(cell, f"attack stage failed: {error}")
                    self._finished()
                continue
            callbacks.stage_done(stage, stage_result)
            for cell in cells:
                callbacks.cell_started(cell)
                try:
                    result = run_defense_cell(cell, self.workspace)
                except Exception as exc:
                    callbacks.cell_failed(cell, describe_error(exc))
                else:
                    callbacks.cell_done(cell, result)
                self._finished()

    def _finished(self) -> None:
        if self.on_cell_finished is not None:
            self.on_cell_finished()
