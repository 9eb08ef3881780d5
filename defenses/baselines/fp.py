"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018).

The paper's observation: a backdoor hides in neurons of the last convolutional layer
that clean inputs leave dormant. The defender measures each channel's mean activation
on clean data, prunes channels in increasing order of it while clean accuracy holds,
then fine-tunes the pruned network on the same clean data.

Where the channels are measured and cut, for any architecture: every ``ImageClassifier``
ends in global pooling of its last feature map followed by one linear layer, so channel
c of that map *after* its normalisation and activation is exactly feature c of
``model.features(x)``, and the classifier column c is its only consumer. The mean of that
feature over the reserve is the paper's "average activation" (post-ReLU), and zeroing
classifier column c removes the channel for good (a plain weight, so the saved model
needs no hooks or pruning re-parametrisation). We do not rank at the raw output of the
last ``nn.Conv2d``: with BatchNorm after it, its mean says nothing about whether the
channel fires (BN re-centres it). On a smoke badnets model that ranking left ASR at
99.8% with 32 of 64 channels cut while reserve accuracy had already fallen to 61%; the
post-activation ranking brought ASR to 49% at the same count with no accuracy loss.

Stopping rule (BackdoorBench's ``acc_ratio``): prune the largest number of
channels k such that reserve accuracy with the k least active channels removed is still
at least ``acc_ratio`` times the unpruned reserve accuracy. Only the reserve decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.device import autocast
from bench.errors import BenchError
from bench.registry import register_defense
from bench.units import last_conv


@dataclass
class FinePruningConfig(DefenseConfig):
    acc_ratio: float = 0.9          # stop before reserve accuracy falls below this share of the start
    max_prune_ratio: float = 1.0    # never prune more than this share of the channels
    epochs: int | None = None       # fine-tuning after pruning; None: the profile's recipe
    lr: float | None = None

    def __post_init__(self) -> None:
        require(self, acc_ratio="(0, 1]", max_prune_ratio="[0, 1]", epochs=">= 1", lr="> 0")


@torch.no_grad()
def reserve_features(model: nn.Module, reserve, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    features, labels = [], []
    for _, x, y in reserve.batches(batch_size):
        with autocast(device):
            features.append(model.features(x).float())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def pruning_path(features: torch.Tensor, labels: torch.Tensor, classifier: nn.Linear,
                 order: torch.Tensor) -> torch.Tensor:
    """Reserve accuracy (fraction) after removing the first k channels of ``order``, k = 0..C.

    Cutting channel c is zeroing feature c before the linear head, so each step only
    re-runs the head on cached features."""
    weight, bias = classifier.weight.float(), classifier.bias.float() if classifier.bias is not None else None
    keep = torch.ones(features.shape[1], device=features.device)
    accuracies = torch.empty(features.shape[1] + 1, device=features.device)
    for k in range(features.shape[1] + 1):
        if k > 0:
            keep[order[k - 1]] = 0.0
        logits = nn.functional.linear(features * keep, weight, bias)
        accuracies[k] = (logits.argmax(1) == labels).float().mean()
    return accuracies


@register_defense("fp")
class FinePruning(Defense):
    """Prune the least active last-layer channels on the reserve until its accuracy drops 10%, then fine-tune."""

    Config = FinePruningConfig
    kind = "post-training"
    version = "1"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: FinePruningConfig = self.config
        model = ctx.model
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Linear) or not hasattr(model, "features"):
            raise BenchError("fp needs an ImageClassifier (features -> one nn.Linear classifier)")
        features, labels = reserve_features(model, ctx.reserve, ctx.finetune_config.batch_size)
        channels = features.shape[1]
        activation = features.mean(0)
        order = torch.argsort(activation)   # least active first
        path = pruning_path(features, labels, classifier, order).cpu()
        threshold = cfg.acc_ratio * float(path[0])
        limit = int(cfg.max_prune_ratio * channels)
        below = torch.nonzero(path[1:limit + 1] < threshold).flatten()
        # The paper stops at the first step whose accuracy falls under the threshold.
        pruned = int(below[0]) if len(below) else limit
        pruned_channels = order[:pruned]
        mask = torch.ones(channels, device=classifier.weight.device)
        mask[pruned_channels] = 0.0
        with torch.no_grad():
            classifier.weight.mul_(mask)
        ctx.log(f"pruned {pruned}/{channels} channels; reserve acc {100 * float(path[0]):.2f} -> "
                f"{100 * float(path[pruned]):.2f} (threshold {100 * threshold:.2f})")

        # Fine-tuning keeps the cut channels cut: their classifier columns get no gradient,
        # so neither momentum nor weight decay can bring them back.
        recipe = ctx.finetune_recipe(epochs=cfg.epochs, lr=cfg.lr)
        handle = classifier.weight.register_hook(lambda grad: grad * mask)
        try:
            history = engine.train(model, ctx.reserve, recipe, ctx.info, seed=ctx.seed,
                                   on_epoch_end=ctx.monitor, desc="fp fine-tune")
        finally:
            handle.remove()
        final_features, _ = reserve_features(model, ctx.reserve, ctx.finetune_config.batch_size)
        with torch.no_grad():
            final_acc = (classifier(final_features).argmax(1) == labels).float().mean().item()
        details = {
            "channels": channels,
            "pruned": pruned,
            "pruned_channels": pruned_channels.tolist(),
            "acc_ratio": cfg.acc_ratio,
            "reserve_acc_start": round(100 * float(path[0]), 2),
            "reserve_acc_threshold": round(100 * threshold, 2),
            "reserve_acc_pruned": round(100 * float(path[pruned]), 2),
            "reserve_acc_final": round(100 * final_acc, 2),
            "reserve_acc_path": [round(100 * float(a), 2) for a in path],  # index = channels pruned
            # The paper's layer, for the report; the cut itself is at body's output (module doc).
            "last_conv": last_conv(model, ctx.reserve.x[:2]),
            "finetune_epochs": recipe.epochs,
            "finetune_lr": recipe.lr,
        }
        # Zeroing classifier column c is zeroing feature c, and the features are the output of
        # ``body`` (ImageClassifier.features, bench/models/base.py), whose only consumer is the
        # classifier: so the cut channels are body's output channels, before fine-tuning.
        # A model with ``features`` but no ``body`` declares nothing rather than a guessed module.
        has_body = isinstance(getattr(model, "body", None), nn.Module)
        selection = {"body": sorted(pruned_channels.tolist())} if has_body else None
        return DefenseResult(model=model, history=history, details=details,
                             tensors={"channel_activation": activation.cpu(), "channel_mask": mask.cpu()},
                             selection=selection)
