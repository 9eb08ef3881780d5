"""The prepared GPU check: every CUDA code path of the benchmark, run once, timed, in under 8
minutes on one GPU, with no download. ``benchmarks/gpu_check.sh`` runs it as is; it appends a
dated, labelled section to BENCHMARKS.md.

Steps (each one's failure is recorded and the next still runs):
1. the device and library versions;
2. one epoch of the standard profile (PreAct-ResNet18, SGD, bf16 autocast, channels_last) on
   50,000 synthetic 3x32x32 images (the second of two epochs: the first pays cuDNN's autotuning);
3. a paper-profile NONE cell (CIFAR ResNet-18, BadNets) on the synthetic dataset with
   ``train.epochs=5``: the attack stage, NONE's analysis on the device (float32 activations sized
   by ``torch.cuda.mem_get_info``), its reset and its 20 fine-tuning epochs;
4. a smoke grid on the Ray executor with two cells per GPU (``--gpus-per-cell 0.5``), when Ray is
   installed (skipped and said so otherwise);
5. ``benchmarks/throughput.py`` on synthetic data: the engine against a toolbox-style pipeline.

    python benchmarks/gpu_check.py [--out BENCHMARKS.md] [--quick]

``--quick`` shrinks every step so that the script itself can be tried on a CPU in a few minutes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench(args: list[str], timeout: int) -> tuple[bool, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "BENCH_PROGRESS": "0"})
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - started
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode == 0, " / ".join(tail), time.perf_counter() - started


def cells(store: Path) -> list[dict]:
    with sqlite3.connect(store) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT attack, defense, status, metrics, timings, details, error FROM cells").fetchall()
    return [dict(row) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script on a CPU")
    args = parser.parse_args()
    os.environ.setdefault("BENCH_PROGRESS", "0")
    import torch

    from bench.device import describe, resolve_device

    device = resolve_device("auto")
    if device.type != "cuda" and not args.quick:
        print("no CUDA device: this check is for a GPU machine (use --quick for a dry run on the CPU)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows: list[tuple[str, str, float]] = []
    started_all = time.perf_counter()

    # 1. device
    facts = f"{describe(device)}; torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts += f", CUDA {torch.version.cuda}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
    rows.append(("device", facts, 0.0))

    # 2. the standard profile's epoch
    t0 = time.perf_counter()
    try:
        from dataclasses import replace

        from bench.data.synthetic import make_synthetic
        from bench.engine import train
        from bench.models import build_model
        from bench.profiles import STANDARD
        from benchmarks.throughput import cifar_sized_info

        info = cifar_sized_info()
        images, _ = make_synthetic(2_000 if args.quick else 50_000, 0, 10, 3, 32)
        model = build_model("small-cnn" if args.quick else STANDARD.model, info).to(device)
        history = train(model, images.to(device), replace(STANDARD.train, epochs=2), info, seed=0, desc="standard")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = len(images) / history[-1]["images_per_s"]
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        rows.append((f"standard profile epoch ({'small-cnn, 2,000' if args.quick else 'preact-resnet18, 50,000'} x 3x32x32)",
                     f"{seconds:.1f} s/epoch, {history[-1]['images_per_s']:.0f} img/s, loss {history[-1]['loss']:.3f}{peak}",
                     time.perf_counter() - t0))
    except Exception as exc:  # a failed step is a finding: record it and go on
        rows.append(("standard profile epoch", f"FAILED: {type(exc).__name__}: {exc}", time.perf_counter() - t0))

    # 3. a paper-profile NONE cell
    store = work / "none.sqlite"
    epochs = "1" if args.quick else "5"
    extra = ["--model", "small-cnn", "-o", "defense.none.finetune_epochs=1"] if args.quick else []
    ok, tail, seconds = bench(["run", "--dataset", "synthetic", "--profile", "paper", "--attacks", "badnets",
                               "--defenses", "undefended,none", "-o", f"train.epochs={epochs}", *extra,
                               "--store", str(store), "--no-report"], timeout=300)
    if ok:
        found = {row["defense"]: row for row in cells(store)}
        undefended, none = json.loads(found["undefended"]["metrics"]), json.loads(found["none"]["metrics"])
        timings = json.loads(found["none"]["details"]).get("timings", {})
        ratio = timings["analysis_s"] / timings["finetune_s"] if timings.get("finetune_s") else float("nan")
        result = (f"undefended C-ACC {undefended['c_acc']} / ASR {undefended['asr']}; NONE C-ACC {none['c_acc']} / "
                  f"ASR {none['asr']}, recall {none.get('det_recall')}; analysis {timings.get('analysis_s')} s = "
                  f"{100 * ratio:.1f}% of fine-tuning ({timings.get('finetune_s')} s)")
    else:
        result = f"FAILED: {tail}"
    rows.append((f"paper-profile NONE cell, synthetic, train.epochs={epochs}", result, seconds))

    # 4. Ray, two cells per GPU
    try:
        import ray  # noqa: F401

        store = work / "ray.sqlite"
        gpus = ["--gpus-per-cell", "0.5"] if device.type == "cuda" else []
        ok, tail, seconds = bench(["run", "--executor", "ray", *gpus, "--dataset", "synthetic", "--profile", "smoke",
                                   "--attacks", "badnets,blend", "--defenses", "undefended,ft,none", "-o",
                                   "train.epochs=2", "--store", str(store), "--no-report"], timeout=300)
        done = sum(row["status"] == "done" for row in cells(store)) if store.exists() else 0
        rows.append(("Ray smoke grid, 6 cells, --gpus-per-cell 0.5", f"{done}/6 done" if ok else f"FAILED: {tail}", seconds))
    except ImportError:
        rows.append(("Ray smoke grid", "skipped: Ray is not installed here (pip install '.[ray]')", 0.0))

    # 5. throughput
    t0 = time.perf_counter()
    table = work / "throughput.md"
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--synthetic", "--out", str(table),
                           *(["--repeats", "1", "--samples", "1024"] if args.quick else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    throughput = table.read_text().strip().splitlines() if done.returncode == 0 and table.exists() else []
    rows.append(("throughput.py --synthetic", "see the table below" if throughput else
                 f"FAILED: {(done.stdout + done.stderr).strip().splitlines()[-1:]}", time.perf_counter() - t0))

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n### GPU check{' (--quick dry run)' if args.quick else ''}, {stamp}, {describe(device)}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs (benchmarks/gpu_check.sh)\n",
             "| step | result | wall s |", "|---|---|---|"]
    lines += [f"| {step} | {result.replace('|', '/')} | {seconds:.0f} |" for step, result, seconds in rows]
    lines.append(f"\nWhole check: {time.perf_counter() - started_all:.0f} s.")
    if throughput:
        lines += [""] + [line for line in throughput if not line.startswith("###")]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as handle:
        handle.write(text)
    return 0 if not any(result.startswith("FAILED") for _, result, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
