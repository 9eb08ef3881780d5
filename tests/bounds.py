"""Bounds on statistics of trained models, and the measurements behind them.

A trained model's ASR, accuracy or detection rate differs from CPU to CPU (AVX-512, AVX2 and
ARM kernels round differently), with the thread count, and with the seed. A bound on one is
therefore set from measurements: ``benchmarks/trained_bounds.py`` runs every test marked
``trained`` over several seeds, 1 and 2 threads and both x86 kernel sets, and prints each
statistic's worst value against its bound. Each such test's docstring states those figures
and the margin its bound keeps below the worst one.

``BENCH_TEST_SEED`` moves every seed the trained tests use (stage seeds, defense seeds, the
synthetic sets they build); CI runs seed 0. With ``BENCH_TEST_RECORD=<file.jsonl>`` every
checked statistic is appended to that file and a bound that does not hold is only recorded,
so one run measures all of them.
"""
from __future__ import annotations

import json
import os

SEED = int(os.environ.get("BENCH_TEST_SEED", "0"))


def _measuring() -> str | None:
    return os.environ.get("BENCH_TEST_RECORD") or None


def _record(name: str, value: float, op: str, bound: float) -> None:
    path = _measuring()
    if path is None:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a") as handle:
        handle.write(json.dumps({"test": test, "statistic": name, "value": float(value), "op": op,
                                 "bound": float(bound)}) + "\n")


def at_least(name: str, value: float, bound: float) -> None:
    """Assert ``value >= bound`` (recorded under ``name`` when measuring)."""
    _record(name, value, ">=", bound)
    if _measuring() is None:
        assert value >= bound, f"{name} = {value} is below its bound {bound}"


def at_most(name: str, value: float, bound: float) -> None:
    """Assert ``value <= bound`` (recorded under ``name`` when measuring)."""
    _record(name, value, "<=", bound)
    if _measuring() is None:
        assert value <= bound, f"{name} = {value} is above its bound {bound}"
