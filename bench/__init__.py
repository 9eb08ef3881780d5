"""bench: a benchmark of backdoor defenses for image classifiers, centred on NONE.

The package, in four layers (each imports only from the layers above it):

- contracts: ``registry`` (plugins by decorator), ``attack``, ``defense`` and ``metric`` (the
  plugin APIs; ``metric`` names the compute layer's ``CellSpec`` and ``Workspace`` in type hints
  only), ``data`` and ``models`` (what is trained), ``units`` (a model's layers and channels, from
  one traced forward pass), ``engine`` (the one training loop and evaluation pass every plugin
  uses), ``profiles``, ``device``, ``config``, ``errors`` and ``progress``;
- compute: ``spec`` (stage and cell identities), ``workspace`` (per-process caches and results
  shared by a stage's cells), ``artifacts`` (verified files), ``cell`` (the two pipelines) and
  ``metrics`` (one plugin per metric);
- orchestration: ``grid`` (names and overrides to cells), ``runner``, ``executors`` (local, Ray)
  and ``store`` (SQLite results and claims);
- interface: ``cli`` and ``reporting`` (which writes reports/ from the store and the artifacts only).
"""
__version__ = "0.1.0"
# Bump when core code changes what a stage or cell computes: finished results then rerun. A
# metric has a version of its own (bench/metric.py): bumping it re-measures, never re-runs.
STAGE_VERSION = "1"
CELL_VERSION = "2"  # 2: metrics measured apart from the cell's identity
