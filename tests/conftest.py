"""Shared fixtures. ``smoke_cell`` runs one (attack x defense) cell on the synthetic dataset
with the smoke profile, reusing one workspace for the whole session so each attack
stage (the undefended model) is trained once and shared by every defense test."""
from __future__ import annotations

import os

import pytest
import torch

from tests.bounds import SEED

os.environ.setdefault("BENCH_PROGRESS", "0")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from bench.workspace import Workspace

    # At most 2 threads (CI's cores), fewer when OMP_NUM_THREADS says so: on a shared machine
    # oversubscribed OpenMP threads spin and run ~10x slower.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    return Workspace(tmp_path_factory.mktemp("runs"), torch.device("cpu"))


@pytest.fixture
def one_thread():
    """For tiny tensors (batches of two, a linear model): thread hand-offs cost more than the
    arithmetic, and on a busy machine a second thread costs 10x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_cell(workspace):
    """smoke_cell(attack, defense, overrides=[...], dataset="synthetic", profile="smoke", seed=SEED) -> result dict
    (``result["metrics"]`` has c_acc, asr, ra, der and detection metrics; ``result["undefended"]``
    the attack stage's c_acc/asr/ra)."""
    from bench.cell import run_defense_cell
    from bench.grid import GridRequest, expand

    def run(attack: str, defense: str, overrides: list[str] | None = None, dataset: str = "synthetic",
            profile: str = "smoke", seed: int | None = None, model: str | None = None) -> dict:
        seed = SEED if seed is None else seed
        cells = expand(GridRequest(dataset, profile, model=model, attacks=[attack], defenses=[defense],
                                   seeds=[seed], overrides=list(overrides or [])))
        assert len(cells) == 1, "smoke_cell runs exactly one cell; use no sweeps"
        return run_defense_cell(cells[0], workspace)

    return run


@pytest.fixture
def registries():
    """Restore every registry (and the imported plugin modules) after a test that loads plugins."""
    import sys

    from bench import registry

    registry.load_builtin_plugins()
    kinds = (registry.DATASETS, registry.MODELS, registry.ATTACKS, registry.DEFENSES, registry.PROFILES, registry.METRICS)
    saved = [dict(r._entries) for r in kinds]
    modules = set(sys.modules)
    hashes = dict(registry._source_hashes)
    yield
    for r, entries in zip(kinds, saved):
        r._entries.clear()
        r._entries.update(entries)
    for name in set(sys.modules) - modules:
        if name.startswith("bench_plugin_"):
            del sys.modules[name]
    registry._source_hashes.clear()
    registry._source_hashes.update(hashes)
