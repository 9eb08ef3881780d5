"""Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): a data-free defense.

A backdoor makes a few channels react strongly to a small input pattern, i.e. gives them
a large Lipschitz constant. CLP bounds each output channel's Lipschitz constant by the
spectral norm of its kernel (with the following BatchNorm folded in) and, layer by layer,
prunes the channels whose bound exceeds mean + u * std of that layer's bounds.

Pairing a convolution with "its" BatchNorm is found generically, without layer names or
module order (the reference code pairs each BN with the last conv defined before it,
which mispairs pre-activation ResNets): ``conv_bn_pairs`` in bench/units.py runs one
all-zeros image (no data is used) and pairs a BatchNorm with the conv whose output tensor
it receives as its input, unmodified (an in-place op in between, such as
ReLU(inplace=True), bumps the tensor's version and breaks the pair). A conv whose output
feeds no BatchNorm directly (the last conv of a pre-activation block, a conv-only model)
is scored on its own kernel and pruned by zeroing its filter; a paired channel is pruned
by zeroing the BatchNorm's weight and bias, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench import units
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.errors import BenchError
from bench.registry import register_defense


@dataclass
class CLPConfig(DefenseConfig):
    u: float = 3.0                 # prune channels with UCLC > mean + u * std (per layer)
    unpaired_convs: bool = True    # also score convs not directly followed by a BatchNorm

    def __post_init__(self) -> None:
        require(self, u=">= 0")


def channel_lipschitz_bounds(conv: nn.Module, bn: nn.Module | None = None) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant (UCLC): the spectral norm of
    the channel's kernel viewed as an (in_channels, kernel_elements) matrix, scaled by
    |gamma / sqrt(running_var + eps)| when a BatchNorm follows."""
    weight = conv.weight.detach().float()
    matrices = weight.reshape(weight.shape[0], weight.shape[1], -1)
    bounds = torch.linalg.matrix_norm(matrices, ord=2)
    if bn is not None:
        scale = torch.ones_like(bounds) if bn.weight is None else bn.weight.detach().float()
        bounds = bounds * (scale / torch.sqrt(bn.running_var.float() + bn.eps)).abs()
    return bounds


def outliers(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of channels whose bound exceeds the layer's mean + u * std."""
    if bounds.numel() < 2:
        return torch.empty(0, dtype=torch.long, device=bounds.device)
    return torch.nonzero(bounds > bounds.mean() + u * bounds.std()).flatten()


def conv_bn_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Module, nn.Module | None, str | None]]:
    """(conv name, conv, bn or None, bn name) for every conv reached by a forward pass, in execution
    order: bench/units.py's pairs, on one all-zeros image (CLP uses no data). A conv called twice
    is scored once."""
    modules = dict(model.named_modules())
    return [(conv, modules[conv], modules[bn] if bn is not None else None, bn)
            for conv, bn in units.conv_bn_pairs(model, torch.zeros((1, *input_shape)))]


@register_defense("clp")
class CLP(Defense):
    """CLP (Zheng et al. 2022): prune channels whose upper-bound Lipschitz constant is an outlier; uses no data."""

    Config = CLPConfig
    kind = "data-free"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: CLPConfig = self.config
        model = ctx.model
        pairs = conv_bn_pairs(model, ctx.info.shape)
        if not pairs:
            raise BenchError("clp: the model has no convolution layers to score")
        layers = []
        # Keyed by the module whose output channel the pruning silences: a paired BatchNorm with
        # gamma and beta zeroed outputs exactly 0. An affine-free BN's channel is cut at its conv's
        # filter, which leaves the BN output a constant while the conv output becomes 0 (its bias,
        # if it has one): there the conv is the key, as for a conv without BatchNorm.
        selection: dict[str, list[int]] = {}
        total = pruned_total = 0
        with torch.no_grad():
            for conv_name, conv, bn, bn_name in pairs:
                if bn is None and not cfg.unpaired_convs:
                    continue
                bounds = channel_lipschitz_bounds(conv, bn)
                prune = outliers(bounds, cfg.u)
                if len(prune):
                    if bn is not None:
                        if bn.weight is not None:
                            bn.weight[prune] = 0
                            bn.bias[prune] = 0
                        else:  # an affine-free BN: silence the channel at its source instead
                            conv.weight[prune] = 0
                    else:
                        conv.weight[prune] = 0
                        if conv.bias is not None:
                            conv.bias[prune] = 0
                key = bn_name if bn is not None and bn.weight is not None else conv_name
                # One conv feeding two affine-free BNs is one key: the union of both prunings.
                selection[key] = sorted(set(selection.get(key, [])) | set(prune.tolist()))
                total += len(bounds)
                pruned_total += len(prune)
                layers.append({"conv": conv_name, "bn": bn_name, "channels": len(bounds),
                               "pruned": prune.tolist(),
                               "uclc_mean": round(float(bounds.mean()), 4),
                               "uclc_std": round(float(bounds.std()), 4) if len(bounds) > 1 else 0.0,
                               "uclc_max": round(float(bounds.max()), 4)})
        ctx.log(f"pruned {pruned_total} of {total} channels (u={cfg.u:g})")
        return DefenseResult(model=model, details={"u": cfg.u, "pruned_channels": pruned_total,
                                                   "scored_channels": total, "layers": layers},
                             selection=selection, unchanged=pruned_total == 0)
