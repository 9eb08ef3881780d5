"""One shared rich progress display, so nested bars (grid > cell > epoch) render together."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)
_progress: Progress | None = None
_depth = 0


def enabled() -> bool:
    return os.environ.get("BENCH_PROGRESS", "1") != "0" and sys.stderr.isatty()


def plain() -> bool:
    """Progress as one line per step: stderr goes to a log file (nohup, a batch job), where
    redrawn bars would be noise but a long grid must still show that it is moving."""
    return os.environ.get("BENCH_PROGRESS", "1") != "0" and not sys.stderr.isatty()


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None, description: str = "",
                 total: float | None = None) -> None:
        self._progress, self._task_id = progress, task_id
        self._description, self._total, self._done = description, total, 0.0

    def advance(self, amount: float = 1, **fields: str) -> None:
        self._done += amount
        if self._progress is not None:
            self._progress.update(self._task_id, advance=amount, **({"info": " ".join(f"{k}={v}" for k, v in fields.items())} if fields else {}))
        elif plain():
            of = f"/{self._total:g}" if self._total is not None else ""
            log(f"  {self._description} {self._done:g}{of} " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def update(self, **fields: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, info=" ".join(f"{k}={v}" for k, v in fields.items()))


@contextlib.contextmanager
def task(description: str, total: float | None) -> Iterator[Task]:
    """A progress bar for the duration of the block (silent when stderr is not a terminal)."""
    global _progress, _depth
    if not enabled():
        yield Task(None, None, description, total)
        return
    if _progress is None:
        _progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                             console=console, transient=False)
        _progress.start()
    _depth += 1
    task_id = _progress.add_task(description, total=total, info="")
    try:
        yield Task(_progress, task_id)
    finally:
        _progress.remove_task(task_id)
        _depth -= 1
        if _depth == 0:
            _progress.stop()
            _progress = None


def log(message: str) -> None:
    console.print(message, highlight=False)
