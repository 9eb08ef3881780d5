"""NONE's statistics: one streamed pass over the training set, vectorised channel scores,
neuron selection, and the per-sample detection score split by Jenks natural breaks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import jenkspy
import numpy as np
import torch
from torch import nn

from bench.data.base import ImageSet
from bench.device import memory_format


@dataclass
class Activations:
    probs: torch.Tensor                 # (N, K) float32 softmax outputs, on the device
    acts: dict[str, torch.Tensor]       # layer -> (N, C) per-channel maxima (device float32 or host float16)


def storage_for(total_values: int, device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where the N x channels matrices live: float32 on the device when it has room, else float16 on the host."""
    need = total_values * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= 0.3 * free:
            return device, torch.float32
        return torch.device("cpu"), torch.float16
    return device, (torch.float32 if need <= 4 * 2**30 else torch.float16)


@torch.no_grad()
def collect(model: nn.Module, data: ImageSet, layers: dict[str, int], batch_size: int) -> Activations:
    """Softmax outputs and, for every layer in ``layers`` (name -> channels), each channel's
    maximum over spatial positions (tokens for a linear layer on sequences), for every
    sample of ``data`` in its fixed order, without augmentation, in eval mode, in float32."""
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    n = len(data)
    store_device, store_dtype = storage_for(n * sum(layers.values()), device)
    acts = {name: torch.empty(n, c, device=store_device, dtype=store_dtype) for name, c in layers.items()}
    window = {"start": 0, "stop": 0}

    def hook(name):
        def record(module, inputs, output):
            if output.dim() == 4:
                reduced = output.amax(dim=(2, 3))
            elif output.dim() == 3:  # linear layer over tokens (N, T, C)
                reduced = output.amax(dim=1)
            else:
                reduced = output
            acts[name][window["start"]:window["stop"]].copy_(reduced.float(), non_blocking=True)
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    was_training = model.training
    model.eval()
    probs = None
    try:
        for indices, x, _ in data.batches(batch_size):
            # batches() yields contiguous ranges in order, so the window needs no host sync.
            window["start"] = window["stop"]
            window["stop"] = window["start"] + len(indices)
            logits = model(x.contiguous(memory_format=memory_format(device))).float()
            if probs is None:
                probs = torch.empty(n, logits.shape[1], device=device)
            probs[window["start"]:window["stop"]] = logits.softmax(dim=1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Activations(probs, acts)


def channel_scores(acts: torch.Tensor, probs: torch.Tensor, lambda_low: float, lambda_high: float) -> torch.Tensor:
    """s_j = max_k [ max_{i: p_ik > lambda_high} a_ij - (mean + 3 std)_{i: p_ik < lambda_low} a_ij ].

    ``acts`` is (N, C), ``probs`` (N, K). A class with no strong (or no weak) sample
    contributes 0. The std is the population std (ddof 0). Masked reductions only: a
    scatter-max over the (sample, class) pairs that are strong, and two mask-weighted
    matrix products for the weak moments (shifted by the channel mean for precision).
    """
    acts = acts.float()
    num_classes = probs.shape[1]
    strong = probs > lambda_high
    weak = probs < lambda_low
    rows, classes = strong.nonzero(as_tuple=True)
    strong_max = acts.new_full((num_classes, acts.shape[1]), float("-inf"))
    strong_max.scatter_reduce_(0, classes.unsqueeze(1).expand(-1, acts.shape[1]), acts[rows], "amax")
    weights = weak.float()
    count = weights.sum(0).clamp_min(1).unsqueeze(1)
    shift = acts.mean(0, keepdim=True)
    centred = acts - shift
    mean_centred = weights.T @ centred / count
    variance = (weights.T @ centred.square() / count - mean_centred.square()).clamp_min(0)
    gap = strong_max - (mean_centred + shift + 3 * variance.sqrt())
    valid = (strong.any(0) & weak.any(0)).unsqueeze(1)
    return torch.where(valid, gap, torch.zeros_like(gap)).amax(0)


def select_channels(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ceil(fraction x C) highest-scored channels of one layer."""
    count = min(len(scores), math.ceil(fraction * len(scores)))
    return torch.topk(scores, count).indices


def sample_scores(acts: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], per_layer: int,
                  device: torch.device) -> torch.Tensor:
    """Each sample's detection score: the sum of its activations on every layer's top channels."""
    total = None
    for name, layer_scores in scores.items():
        top = torch.topk(layer_scores, min(per_layer, len(layer_scores))).indices
        part = acts[name][:, top.to(acts[name].device)].to(device).float().sum(1)
        total = part if total is None else total + part
    return total


@dataclass
class Split:
    flagged: torch.Tensor    # sample indices
    jenks_break: float | None


def jenks_split(values: torch.Tensor) -> Split:
    """Two Jenks natural-breaks groups; samples at or above the break are flagged (as the
    spec restates the artifact; with jenkspy's convention the break is the largest value
    of the lower group, so it and its ties are flagged too). With fewer than two distinct
    values there is nothing to split and nothing is flagged. jenkspy's exact algorithm is
    quadratic in N (measured 2.9 s for 60 000 samples on one CPU core)."""
    array = values.double().cpu().numpy()
    if len(np.unique(array)) < 2:
        return Split(torch.empty(0, dtype=torch.long), None)
    jenks_break = float(jenkspy.jenks_breaks(array, n_classes=2)[1])
    flagged = torch.from_numpy(np.nonzero(array >= jenks_break)[0]).long()
    return Split(flagged, jenks_break)
