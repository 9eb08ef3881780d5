"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

A backdoored network is unusually sensitive to small multiplicative perturbations of a
few neurons: perturbing them collapses the clean prediction onto the target class. ANP
learns a mask m in [0, 1] per neuron on clean data, under an adversarial neuron
perturbation (delta on the neuron's weight, xi on its bias, both in [-eps, eps]):

    min_m  alpha * L(m, 0, 0) + (1 - alpha) * max_{delta, xi} L(m + delta, 1 + xi)

and prunes the neurons whose mask ends below a threshold. A "neuron" is an output channel
of every BatchNorm (its gamma is masked/perturbed, its beta perturbed), found by module
traversal (``modules_of_kind`` in bench/units.py), so any architecture works without layer
names; a model with no BatchNorm uses the output channels of its convolutions instead (the
filter is masked, the bias perturbed).
The mask and perturbation are parametrizations of the layer's weight and bias (gamma *
(m + delta), beta * (1 + xi)), so the layer's own forward applies them whatever it is.

As in the reference code, the network runs in training mode while the masks learn
(BatchNorm normalises with the statistics of each clean batch; the running statistics it
accumulates are restored afterwards, as the reference prunes a freshly loaded copy), and
the perturbation takes one signed-gradient step of size eps from a uniform random start.
One departure: the pruning threshold is chosen on the reserve instead of being fixed at
0.2. Among the thresholds step, 2*step, ..., threshold_max, the largest whose pruned model
keeps reserve accuracy within ``max_acc_drop`` (absolute, as a fraction) of the unpruned
model's is used; when none does, nothing is pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.errors import BenchError
from bench.registry import register_defense
from bench.units import modules_of_kind


@dataclass
class ANPConfig(DefenseConfig):
    eps: float = 0.4               # bound of the neuron perturbations delta, xi
    perturb_steps: int = 1         # signed-gradient steps of the inner maximisation (step size eps / perturb_steps)
    alpha: float = 0.2             # weight of the natural loss against the perturbed loss
    mask_lr: float = 0.2           # SGD (momentum 0.9) on the masks
    iterations: int = 2000         # mask optimisation steps (batches)
    batch_size: int = 128
    augment: bool = True           # the reference trains the masks on augmented clean data
    threshold_step: float = 0.05   # candidate pruning thresholds: step, 2*step, ... threshold_max
    threshold_max: float = 0.9
    max_acc_drop: float = 0.05     # largest pruning whose reserve accuracy stays within this of the unpruned
    bn_batch_stats: bool = True    # BatchNorm uses batch statistics while masks learn (the reference)
    curve_points: int = 20         # at most this many test-curve points (ctx.monitor) over the mask epochs

    def __post_init__(self) -> None:
        require(self, eps=">= 0", perturb_steps=">= 1", alpha="[0, 1]", mask_lr="> 0", iterations=">= 1",
                batch_size=">= 1", threshold_step="(0, 1]", threshold_max="(0, 1]", max_acc_drop="[0, 1]",
                curve_points=">= 1")


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose output channels ANP treats as neurons: every affine BatchNorm, or,
    in a model without BatchNorm, every convolution, in definition order."""
    bns = [(name, m) for name, m in modules_of_kind(model, "batchnorm") if m.weight is not None]
    return bns or modules_of_kind(model, "conv")


class NeuronMasks:
    """Per-neuron masks and perturbations, attached as parametrizations of each layer's weight
    (gamma or filter) and bias, so the layer's own forward (any BatchNorm subclass, fused
    activations included) computes with weight * (m + delta) and bias * (1 + xi)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], device: torch.device) -> None:
        self.names = [name for name, _ in layers]
        self.modules = [module for _, module in layers]
        sizes = [module.weight.shape[0] for module in self.modules]
        self.masks = [torch.ones(n, device=device, requires_grad=True) for n in sizes]
        self.weight_noise = [torch.zeros(n, device=device, requires_grad=True) for n in sizes]
        self.bias_noise = [torch.zeros(n, device=device, requires_grad=True) for n in sizes]
        self.perturbed = False
        self.noise_detached = False
        for index, module in enumerate(self.modules):
            parametrize.register_parametrization(module, "weight", _Coefficient(self, index, bias=False), unsafe=True)
            if module.bias is not None:
                parametrize.register_parametrization(module, "bias", _Coefficient(self, index, bias=True), unsafe=True)

    def coefficient(self, index: int, bias: bool) -> torch.Tensor | None:
        """What multiplies neuron ``index``'s weight (m, or m + delta) or bias (None, or 1 + xi)."""
        if not self.perturbed:
            return None if bias else self.masks[index]
        noise = (self.bias_noise if bias else self.weight_noise)[index]
        if self.noise_detached:
            noise = noise.detach()
        return 1 + noise if bias else self.masks[index] + noise

    def noises(self) -> list[torch.Tensor]:
        return self.weight_noise + self.bias_noise

    @torch.no_grad()
    def clip_masks(self) -> None:
        for mask in self.masks:
            mask.clamp_(0, 1)

    def remove(self) -> None:
        """Restore the layers' own, unmasked parameters."""
        for module in self.modules:
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)


class _Coefficient(nn.Module):
    def __init__(self, owner: NeuronMasks, index: int, bias: bool) -> None:
        super().__init__()
        self.owner, self.index, self.bias = [owner], index, bias  # a list: not a submodule to register

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        coefficient = self.owner[0].coefficient(self.index, self.bias)
        if coefficient is None:
            return original
        return original * coefficient.view((-1,) + (1,) * (original.dim() - 1))


def prune_below(masks: list[torch.Tensor], modules: list[nn.Module], threshold: float) -> int:
    """Zero the weight (gamma, or the conv filter) of every neuron whose mask is below ``threshold``."""
    count = 0
    with torch.no_grad():
        for mask, module in zip(masks, modules):
            pruned = mask < threshold
            module.weight[pruned] = 0
            count += int(pruned.sum())
    return count


@register_defense("anp")
class ANP(Defense):
    """ANP (Wu & Wang 2021): learn neuron masks under adversarial neuron perturbation on the reserve, prune low masks."""

    Config = ANPConfig
    kind = "post-training"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: ANPConfig = self.config
        model = ctx.model
        layers = neuron_layers(model)
        if not layers:
            raise BenchError("anp: the model has neither BatchNorm nor convolution layers to mask")
        reserve = ctx.reserve
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # only the masks learn; the network's weights stay as delivered
            p.requires_grad_(False)
        masks = NeuronMasks(layers, ctx.device)

        def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            if not cfg.bn_batch_stats:
                net.eval()
            masks.clip_masks()  # the projection after the previous optimizer step
            if cfg.eps > 0:
                with torch.no_grad():
                    for noise in masks.noises():
                        noise.uniform_(-cfg.eps, cfg.eps)
                masks.perturbed, masks.noise_detached = True, False
                for _ in range(cfg.perturb_steps):
                    loss = F.cross_entropy(net(x), y)
                    grads = torch.autograd.grad(loss, masks.noises())
                    with torch.no_grad():
                        for noise, grad in zip(masks.noises(), grads):
                            noise.add_(grad.sign(), alpha=cfg.eps / cfg.perturb_steps).clamp_(-cfg.eps, cfg.eps)
                masks.noise_detached = True
                loss_robust = F.cross_entropy(net(x), y)
            else:
                loss_robust = torch.zeros((), device=x.device)
            masks.perturbed = False
            loss_natural = F.cross_entropy(net(x), y)
            return cfg.alpha * loss_natural + (1 - cfg.alpha) * loss_robust

        steps_per_epoch = max(1, math.ceil(len(reserve) / cfg.batch_size))
        epochs = max(1, math.ceil(cfg.iterations / steps_per_epoch))
        recipe = engine.TrainConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="sgd", lr=cfg.mask_lr,
                                    momentum=0.9, weight_decay=0.0, schedule="constant", augment=cfg.augment,
                                    freeze_bn=not cfg.bn_batch_stats, amp=ctx.finetune_config.amp)
        buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
        try:
            history = engine.train(model, reserve, recipe, ctx.info, seed=ctx.seed, loss_fn=loss_fn,
                                   on_epoch_end=_thinned(ctx.monitor, epochs, cfg.curve_points),
                                   parameters=masks.masks, desc="anp masks")
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            masks.remove()
            for p in trainable:
                p.requires_grad_(True)
        masks.clip_masks()
        values = [mask.detach() for mask in masks.masks]

        threshold, scan = self._choose_threshold(model, values, masks.modules, reserve, cfg)
        pruned = prune_below(values, masks.modules, threshold) if threshold > 0 else 0
        ctx.log(f"threshold {threshold:g}: pruned {pruned} of {sum(len(v) for v in values)} neurons")
        flat = torch.cat(values)
        details = {
            "neuron_layers": masks.names, "neurons": int(flat.numel()), "threshold": threshold,
            "pruned_neurons": pruned, "threshold_scan": scan, "mask_epochs": epochs,
            "mask_quantiles": {q: round(float(v), 4) for q, v in
                               zip(("min", "q10", "median", "q90", "max"),
                                   torch.quantile(flat.float(), torch.tensor([0, .1, .5, .9, 1.], device=flat.device)))},
        }
        # Keyed by the masked layer itself (the BatchNorm, or the conv without BatchNorm): its output
        # channel is what ANP silences. Pruning zeroes gamma (or the filter) and keeps beta (or the
        # conv bias), as the reference does, so that channel becomes the constant beta rather than 0;
        # the selection metrics zero it (bench/metrics/selection.py).
        selection = {name: torch.nonzero(v < threshold).flatten().tolist() if threshold > 0 else []
                     for name, v in zip(masks.names, values)}
        return DefenseResult(model=model, history=history, details=details,
                             tensors={f"mask.{name}": v.cpu() for name, v in zip(masks.names, values)},
                             selection=selection)

    @staticmethod
    def _choose_threshold(model: nn.Module, masks: list[torch.Tensor], modules: list[nn.Module], reserve,
                          cfg: ANPConfig) -> tuple[float, list[dict]]:
        """The largest candidate threshold whose pruned model keeps reserve accuracy within tolerance."""
        original = [module.weight.detach().clone() for module in modules]

        def reserve_accuracy() -> float:
            return float((engine.predict(model, reserve.x) == reserve.y).float().mean())

        base = reserve_accuracy()
        scan = [{"threshold": 0.0, "pruned": 0, "reserve_acc": round(100 * base, 2)}]
        chosen = 0.0
        count = int(round(cfg.threshold_max / cfg.threshold_step)) if cfg.threshold_step > 0 else 0
        try:
            for k in range(1, count + 1):
                threshold = round(k * cfg.threshold_step, 6)
                pruned = prune_below(masks, modules, threshold)
                accuracy = reserve_accuracy()
                scan.append({"threshold": threshold, "pruned": pruned, "reserve_acc": round(100 * accuracy, 2)})
                if accuracy >= base - cfg.max_acc_drop:
                    chosen = threshold
                with torch.no_grad():
                    for module, weight in zip(modules, original):
                        module.weight.copy_(weight)
        finally:
            with torch.no_grad():
                for module, weight in zip(modules, original):
                    module.weight.copy_(weight)
        return chosen, scan


def _thinned(monitor, epochs: int, points: int):
    """The test-curve monitor on at most ``points`` evenly spaced epochs (mask epochs can number hundreds)."""
    if monitor is None or points <= 0:
        return None
    every = max(1, math.ceil(epochs / points))

    def callback(epoch: int, model: nn.Module) -> dict:
        return monitor(epoch, model) if epoch % every == 0 or epoch == epochs else {}

    return callback
