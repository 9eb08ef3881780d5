"""bench: a benchmark of backdoor defenses for image classifiers, centred on NONE.

The package, in four layers (each imports only from the layers above it):

- contracts: ``registry`` (plugins by decorator), ``attack`` and ``defense`` (the plugin APIs),
  ``data`` and ``models`` (what is trained), ``config`` and ``errors``;
- compute: ``engine`` (the one training loop), ``spec`` (stage and cell identities),
  ``workspace`` (per-process caches), ``artifacts`` (verified files), ``cell`` (the two
  pipelines) and ``metrics`` (every stored metric, declared once);
- orchestration: ``grid`` (names and overrides to cells), ``runner``, ``executors`` (local, Ray)
  and ``store`` (SQLite results and claims);
- interface: ``cli`` and ``report`` (which reads only the store and the artifacts).
"""
__version__ = "0.1.0"
# Bump when core code changes what a stage or cell computes: finished results then rerun.
STAGE_VERSION = "1"
CELL_VERSION = "1"
# Bump when bench/metrics/reasr.py changes what REASR measures: only cells that scan rerun.
SCAN_VERSION = "2"
