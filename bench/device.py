"""Device choice and the per-device fast paths (bf16 autocast, channels_last on CUDA)."""
from __future__ import annotations

import contextlib
import os

import torch

from bench.errors import BenchError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


FAST_PATHS_ENV = "BENCH_FAST_PATHS"


def fast_paths(device: torch.device) -> bool:
    """Whether bf16 autocast is used: on CUDA, where it pays. On the CPU it is off, except with
    BENCH_FAST_PATHS=1, which runs the same code path on the CPU (``torch.autocast("cpu")``), so
    that the tests exercise it on machines without a GPU."""
    return device.type == "cuda" or os.environ.get(FAST_PATHS_ENV) == "1"


def autocast(device: torch.device, enabled: bool = True):
    if enabled and fast_paths(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on every device: oneDNN's CPU convolutions and pooling are faster in it too.
    Measured 2026-12-02 (2 threads, batch 128, a training step): small-cnn 1.31-1.60x, NiN 1.39x,
    ResNet-18 1.23x, PreAct-ResNet18 1.19x, VGG-16 1.16x on AVX-512; small-cnn 1.31-1.41x and
    PreAct-ResNet18 1.08x with AVX2 kernels (BENCHMARKS.md)."""
    return torch.channels_last


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (on the CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
