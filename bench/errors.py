"""The one exception type for what a user can fix: the CLI prints it as one line and exits 2."""
from __future__ import annotations


class BenchError(Exception):
    """A user-facing error: printed as one line by the CLI, exit code 2 (a cell that raises it is
    recorded as failed with its message)."""
