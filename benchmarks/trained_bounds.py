"""Measure every bounded statistic of the trained tests across seeds, threads and CPU kernels.

A bound on a trained model's ASR or accuracy must hold on any CPU, not just on the one where
the test was written. This runs the tests marked ``trained`` (``tests/bounds.py``) once per
(seed, threads, kernel set) and prints, for each statistic, its bound, the range measured and
the margin between the bound and the worst value. Set bounds from that table, with a margin,
and quote it in the test's docstring.

Kernel sets: ``native`` is what this CPU picks; ``avx2`` makes PyTorch, oneDNN and MKL use
their AVX2 code even on an AVX-512 CPU (the AMD Zen 2/3 and older Intel paths); ``scalar``
turns off PyTorch's own vector kernels (a third rounding, as a stand-in for other ISAs such as
ARM's).

    python benchmarks/trained_bounds.py                             # seeds 0,1,2 x threads 1,2 x native,avx2
    python benchmarks/trained_bounds.py --seeds 0 --isa avx2 -- -k input_aware
    python benchmarks/trained_bounds.py --threads 1 --jobs 2 --records runs/bounds   # 1-thread runs fill 2 cores
    python benchmarks/trained_bounds.py --threads 2 --records runs/bounds            # then the 2-thread ones
    python benchmarks/trained_bounds.py --table-only --records runs/bounds           # one table over both
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def run_one(seed: int, threads: int, isa: str, pytest_args: list[str], workdir: Path) -> tuple[str, list[dict], float]:
    label = f"seed {seed}, {threads} thread{'s' if threads > 1 else ''}, {isa}"
    record = workdir / f"s{seed}-t{threads}-{isa}.jsonl"
    record.unlink(missing_ok=True)
    env = {**os.environ, **ISA_ENV[isa], "BENCH_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "BENCH_TEST_RECORD": str(record), "BENCH_PROGRESS": "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "trained", *pytest_args]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode not in (0, 5):  # 5: nothing selected
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
        print(f"[{label}] pytest exited {completed.returncode} (a test errored, not a bound):\n{tail}", file=sys.stderr)
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    for row in rows:
        row["config"] = label
    print(f"[{label}] {len(rows)} statistics in {seconds:.0f} s", file=sys.stderr)
    return label, rows, seconds


def margin(row: dict) -> float:
    return row["value"] - row["bound"] if row["op"] == ">=" else row["bound"] - row["value"]


def table(rows: list[dict]) -> str:
    grouped: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for row in rows:
        grouped[(row["test"], row["statistic"])].append(row)
    lines = ["| test | statistic | bound | measured (min .. max) | worst margin | worst config | runs |",
             "|---|---|---|---|---|---|---|"]
    for (test, statistic), group in sorted(grouped.items()):
        worst = min(group, key=margin)
        values = [r["value"] for r in group]
        bounds = sorted({round(r["bound"], 4) for r in group})
        bound = f"{group[0]['op']} {bounds[0]:g}" if len(bounds) == 1 else f"{group[0]['op']} {bounds[0]:g}..{bounds[-1]:g}"
        flag = "" if margin(worst) >= 0 else " **FAILS**"
        lines.append(f"| {test.split('::', 1)[-1]} | {statistic} | {bound} | {min(values):.4g} .. {max(values):.4g} | "
                     f"{margin(worst):.4g}{flag} | {worst['config']} | {len(group)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isa", default="native,avx2", help=f"comma list of {', '.join(ISA_ENV)}")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once (use 1-thread runs to fill cores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--records", type=Path, default=None, help="keep the raw JSONL records in this directory")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print the table of every record already in --records")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (files, -k)")
    args = parser.parse_args()
    if args.table_only:
        if args.records is None:
            parser.error("--table-only reads --records DIR")
        rows = []
        for path in sorted(args.records.glob("*.jsonl")):
            label = path.stem.replace("-", ", ")
            rows += [{**json.loads(line), "config": label} for line in path.read_text().splitlines()]
        print(table(rows))
        return 0 if all(margin(row) >= 0 for row in rows) else 1
    isas = args.isa.split(",")
    for isa in isas:
        if isa not in ISA_ENV:
            parser.error(f"unknown --isa {isa!r}; valid: {', '.join(ISA_ENV)}")
    configs = list(itertools.product([int(s) for s in args.seeds.split(",")], [int(t) for t in args.threads.split(",")], isas))
    workdir = args.records or Path(tempfile.mkdtemp(prefix="bounds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda c: run_one(*c, args.pytest_args, workdir), configs))
    rows = [row for _, found, _ in results for row in found]
    text = (f"Trained-test statistics, {time.strftime('%Y-%m-%d')}, {len(configs)} configurations "
            f"(seeds {args.seeds}; threads {args.threads}; kernels {args.isa})\n\n{table(rows)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(margin(row) >= 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
