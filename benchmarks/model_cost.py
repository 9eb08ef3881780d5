"""What a model costs the quick profile on this machine: one training epoch, NONE's analysis pass
and the selection oracle over every unit NONE analyses (NONE selects in every layer it analyses), per model, and each as a ratio to small-cnn.

    python benchmarks/model_cost.py [--models small-cnn,cnn-wide,resnet18-w16] [--samples 12000] [--repeats 3]

Fashion-MNIST when its files are present (else synthetic 1x28x28 images, say so in the output);
median of the repeats, after one warm-up. The figure that decides a quick-profile model is the
epoch ratio: the attack stage and every fine-tuning defense scale with it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.data.base import ImageSet, load_dataset
from bench.engine import TrainConfig, train
from bench.metrics.selection import unit_ablation_asr
from bench.models import build_model
from defenses.none.graph import analyse_model
from defenses.none.scoring import collect


def data(samples: int) -> tuple[object, ImageSet, ImageSet, str]:
    try:
        info, full, test = load_dataset("fashion-mnist")
        source = "Fashion-MNIST"
    except Exception as exc:  # no files and no network: synthetic images of the same shape
        from bench.data.base import DatasetInfo
        from bench.data.synthetic import make_synthetic

        full, test = make_synthetic(samples, 1000, num_classes=10, channels=1, side=28)
        info = DatasetInfo("synthetic-28", 10, (1, 28, 28), (0.5,), (0.25,), hflip=False)
        source = f"synthetic 1x28x28 (Fashion-MNIST unavailable: {exc.__class__.__name__})"
    return info, full.subset(torch.arange(min(samples, len(full)))), test, source


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(name: str, info, images: ImageSet, test: ImageSet, repeats: int, oracle_images: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name, info)
    recipe = TrainConfig(epochs=1, batch_size=128, lr=0.05, schedule="cosine")
    graph = analyse_model(model.eval(), images.x[:2].float() / 255)
    layers = {layer.name: layer.channels for layer in graph.layers}
    silenced = [layer.bn or layer.name for layer in graph.layers]  # where NONE's reset silences a unit
    steps = {
        "epoch_s": lambda: train(model, images, recipe, info, seed=0, desc=f"{name} epoch"),
        "analysis_s": lambda: collect(model.eval(), images, layers, 512),
        "oracle_s": lambda: unit_ablation_asr(model.eval(), silenced, test.x[:oracle_images], 0),
    }
    result = {"units": sum(layers.values()), "params": sum(p.numel() for p in model.parameters())}
    for key, step in steps.items():
        step()  # warm-up: allocator, kernels, first-call costs
        result[key] = statistics.median(timed(step) for _ in range(repeats))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-cnn,cnn-wide,resnet18-w16")
    parser.add_argument("--samples", type=int, default=12000, help="training images per epoch and analysis pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--oracle-images", type=int, default=250,
                        help="triggered images for the oracle (its cost is linear in them; cells default to 1,000)")
    args = parser.parse_args()
    info, images, test, source = data(args.samples)
    print(f"{source}: {len(images)} images per epoch and analysis pass, {args.oracle_images} for the oracle; "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    rows = {name: measure(name, info, images, test, args.repeats, args.oracle_images) for name in args.models.split(",")}
    base = rows.get("small-cnn")
    print(f"| model | parameters | analysed units | epoch s | analysis s | oracle s ({args.oracle_images} images) | "
          "epoch / small-cnn |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = f"{row['epoch_s'] / base['epoch_s']:.2f}x" if base else "-"
        print(f"| {name} | {row['params']:,} | {row['units']} | {row['epoch_s']:.2f} | {row['analysis_s']:.2f} | "
              f"{row['oracle_s']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
