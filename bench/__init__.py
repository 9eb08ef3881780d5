"""bench: a benchmark of backdoor defenses for image classifiers, centred on NONE.

Read top-down: ``registry`` (plugins), ``data`` and ``models`` (what is trained),
``engine`` (the one training loop), ``attack`` / ``defense`` (plugin APIs), ``metrics``,
``cell`` (one stage / cell as a pure function), ``store`` (SQLite results), ``runner``
(the grid), ``cli``; ``report`` renders the store into tables and figures.
"""
__version__ = "0.1.0"
# Bump when core code changes what a stage or cell computes: finished results then rerun.
STAGE_VERSION = "1"
CELL_VERSION = "1"
# Bump when bench/scan.py changes what REASR measures: only cells that scan rerun.
SCAN_VERSION = "2"
