"""Training throughput: the project's engine vs a toolbox-style pipeline, same model, data, machine.

The engine keeps the dataset on the device as uint8 and augments whole batches there; the
toolbox pipeline is what most backdoor toolboxes do: a torch Dataset returning PIL images
through torchvision transforms, batched by a DataLoader with worker processes.

    python benchmarks/throughput.py [--repeats 3] [--samples 8192] [--out BENCHMARKS.md]

Prints images/s for both and their ratio (median of the repeats) per configuration, and the
model alone: the same optimisation steps on batches made before the clock starts (no sampling,
no augmentation, no transfer). No input pipeline can beat that rate, so engine / model-alone says
how much of the epoch the data path still costs, and model-alone / toolbox caps the ratio any
pipeline could reach against the toolbox on that machine. The model alone runs in the engine's
precision (bf16 autocast on CUDA, fp32 on the CPU); the toolbox in fp32, as toolboxes do.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from bench.data.base import ImageSet, load_dataset, to_unit
from bench.data.synthetic import make_synthetic
from bench.device import autocast, describe, memory_format, resolve_device
from bench.engine import TrainConfig, train
from bench.models import build_model
from bench.registry import DATASETS


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform) -> None:
        self.x = images.x.cpu().numpy()
        self.y = images.y.cpu().numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        array = self.x[index]
        image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
        return self.transform(image), int(self.y[index])


def toolbox_epoch(model, images: ImageSet, info, device, batch_size: int, workers: int) -> float:
    steps = [transforms.RandomCrop(info.side, padding=info.crop_padding)]
    if info.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    loader = DataLoader(PILDataset(images, transforms.Compose(steps)), batch_size=batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=False, pin_memory=device.type == "cuda")
    batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    return len(images) / timed_steps(model, batches, device, amp=False)


def timed_steps(model, batches, device, amp: bool) -> float:
    """Seconds for one SGD step per batch of ``batches`` (an iterable: its own work is timed too)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for x, y in batches:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def model_alone_epoch(model, images: ImageSet, device, batch_size: int) -> float:
    """The optimisation steps alone: every batch is a [0, 1] float tensor in the model's layout,
    on the device, before the clock starts."""
    layout = memory_format(device)
    model.to(memory_format=layout)
    batches = [(to_unit(images.x[start:start + batch_size]).to(device).contiguous(memory_format=layout),
                images.y[start:start + batch_size].to(device)) for start in range(0, len(images), batch_size)]
    return len(images) / timed_steps(model, batches, device, amp=True)  # autocast as the engine's default


def engine_epoch(model, images: ImageSet, info, device, batch_size: int, compile: bool = False) -> float:
    # A compiled model's first epoch pays the compilation: its second epoch is the one measured.
    recipe = TrainConfig(epochs=2 if compile else 1, batch_size=batch_size, lr=0.01, compile=compile)
    history = train(model, images.to(device), recipe, info, seed=0, desc="engine")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return history[-1]["images_per_s"]


def measure(label: str, model_name: str, images: ImageSet, info, device, repeats: int, batch_size: int, workers: int,
            compile: bool = False) -> dict:
    engine_rates, toolbox_rates, compiled_rates, alone_rates = [], [], [], []
    for _ in range(repeats):
        torch.manual_seed(0)
        alone_rates.append(model_alone_epoch(build_model(model_name, info).to(device), images, device, batch_size))
        torch.manual_seed(0)
        engine_rates.append(engine_epoch(build_model(model_name, info).to(device), images, info, device, batch_size))
        torch.manual_seed(0)
        toolbox_rates.append(toolbox_epoch(build_model(model_name, info).to(device), images, info, device, batch_size, workers))
        if compile:
            torch.manual_seed(0)
            compiled_rates.append(engine_epoch(build_model(model_name, info).to(device), images, info, device, batch_size,
                                               compile=True))
    engine_rate, toolbox_rate = statistics.median(engine_rates), statistics.median(toolbox_rates)
    alone_rate = statistics.median(alone_rates)
    row = {"config": label, "model": model_name, "samples": len(images), "engine": engine_rate, "toolbox": toolbox_rate,
           "ratio": engine_rate / toolbox_rate, "alone": alone_rate,
           "compiled": statistics.median(compiled_rates) if compile else None}
    line = (f"{label:<40} engine {engine_rate:9.0f} img/s   toolbox {toolbox_rate:9.0f} img/s   ratio {row['ratio']:.2f}x"
            f"   model alone {alone_rate:9.0f} img/s (engine at {engine_rate / alone_rate:.0%} of it,"
            f" ceiling ratio {alone_rate / toolbox_rate:.2f}x)")
    if compile:
        line += f"   engine+compile {row['compiled']:9.0f} img/s ({row['compiled'] / engine_rate:.2f}x the engine)"
    print(line, flush=True)
    return row


def cifar_sized_info():
    return DATASETS.get("synthetic").info.__class__("cifar10-sized", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, True)


def standard_epoch_seconds(device) -> float | None:
    """One epoch of the standard profile's recipe on CIFAR-10-sized data (50 000 x 3x32x32),
    PreAct-ResNet18; only on a GPU (a CPU estimate would be a guess, not a measurement)."""
    if device.type != "cuda":
        return None
    from dataclasses import replace

    from bench.profiles import STANDARD

    info = cifar_sized_info()
    images, _ = make_synthetic(50_000, 0, 10, 3, 32)
    recipe = replace(STANDARD.train, epochs=2)  # the first epoch pays cuDNN autotuning and allocator warm-up
    torch.manual_seed(0)
    history = train(build_model(STANDARD.model, info).to(device), images.to(device), recipe, info, seed=0, desc="standard")
    torch.cuda.synchronize()
    return len(images) / history[-1]["images_per_s"]


def small_cnn_row(samples: int, synthetic: bool, device):
    """(label, dataset info, training images) of the small-cnn row: Fashion-MNIST, or synthetic 1x28x28."""
    if synthetic:
        info = DATASETS.get("fashion-mnist").info
        return "small-cnn, synthetic 28x28x1", info, make_synthetic(samples, 0, info.num_classes, 1, 28)[0]
    info, train_set, _ = load_dataset("fashion-mnist")
    return "small-cnn, Fashion-MNIST 28x28x1", info, train_set.subset(torch.arange(min(samples, len(train_set))))


def preact_resnet18_row(samples: int, synthetic: bool, device):
    """(label, dataset info, training images) of the PreAct-ResNet18 row: synthetic 3x32x32 (2048 at most on a CPU)."""
    images, _ = make_synthetic(min(samples, 2048) if device.type == "cpu" else samples, 0, 10, 3, 32)
    return "preact-resnet18, synthetic 32x32x3", cifar_sized_info(), images


ROWS = {"small-cnn": small_cnn_row, "preact-resnet18": preact_resnet18_row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8192, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="also measure the engine with torch.compile (TrainConfig.compile, `-o train.compile=true`)")
    parser.add_argument("--out", default=None, help="append a results table to this markdown file")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic 1x28x28 images instead of Fashion-MNIST (no dataset files, no download)")
    parser.add_argument("--models", default=",".join(ROWS),
                        help=f"the rows to measure, a comma list of {', '.join(ROWS)} (default: all)")
    args = parser.parse_args()
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(models) - set(ROWS))
    if unknown or not models:
        parser.error(f"--models {args.models!r}: valid names are {', '.join(ROWS)}")
    os.environ.setdefault("BENCH_PROGRESS", "0")
    device = resolve_device(args.device)
    rows = []
    for model_name in models:
        label, info, images = ROWS[model_name](args.samples, args.synthetic, device)
        rows.append(measure(label, model_name, images, info, device, args.repeats, args.batch_size, args.workers,
                            args.compile))
    if args.out:
        stamp = datetime.date.today().isoformat()
        lines = [f"\n### Throughput, {stamp}, {describe(device)}, {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} CPUs, workers={args.workers}, batch {args.batch_size}, median of {args.repeats}\n",
                 "| configuration | images/epoch | engine img/s | toolbox img/s | ratio | model alone img/s "
                 "(engine's share; ceiling ratio) | engine + torch.compile img/s |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['samples']} | {r['engine']:.0f} | {r['toolbox']:.0f} | {r['ratio']:.2f}x | "
                  f"{r['alone']:.0f} ({r['engine'] / r['alone']:.0%}; {r['alone'] / r['toolbox']:.2f}x) | "
                  + (f"{r['compiled']:.0f} ({r['compiled'] / r['engine']:.2f}x) |" if r["compiled"] is not None else "not measured |")
                  for r in rows]
        seconds = standard_epoch_seconds(device)
        lines += ["", "| standard profile epoch, preact-resnet18, 50 000 x 3x32x32 | device | s/epoch |", "|---|---|---|",
                  f"| GPU | {describe(device)} | {seconds:.1f} |" if seconds is not None else
                  "| GPU | (no GPU on this machine: left empty, not estimated) | |"]
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
