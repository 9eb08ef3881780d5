from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench.attack import Attack, AttackConfig, AttackContext
from bench.config import require
from bench.data.base import ImageSet, to_unit
from bench.errors import BenchError
from bench.registry import register_attack


@dataclass
class TrojanConfig(AttackConfig):
    mask: Literal["watermark", "square"] = "watermark"
    size: int | None = None          # side of the trigger's box in pixels; None = 10 px at 32x32, scaled
    optimize: bool = True            # False: a fixed seeded pattern instead of the optimised one
    neurons: int = 2                 # how many neurons of the last conv layer the trigger excites
    target_value: float = 100.0      # activation the optimisation pushes the neurons towards
    steps: int = 200                 # gradient steps of the trigger optimisation
    lr: float = 0.1                  # step size (Adam) of the trigger optimisation
    batch_size: int = 128            # clean training images the trigger is stamped on per step

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, size=">= 1", neurons=">= 1", target_value="> 0", steps=">= 1", lr="> 0", batch_size=">= 1")


def watermark_mask(side: int, box: int) -> torch.Tensor:
    """A watermark-like logo (a ring crossed by a diagonal stroke) in the bottom-right
    ``box`` x ``box`` corner of a ``side`` x ``side`` image, rasterised so it keeps its
    shape at any size; 1 inside the strokes, 0 elsewhere."""
    centres = (torch.arange(box, dtype=torch.float32) + 0.5) / box * 2 - 1  # pixel centres in [-1, 1]
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    # Strokes at least ~one pixel wide, so small images still get a connected shape.
    half_width = max(0.14, 1.1 / box)
    ring = ((u ** 2 + v ** 2).sqrt() - 0.72).abs() <= half_width
    stroke = ((u - v).abs() / math.sqrt(2) <= half_width) & (u.abs() <= 0.72) & (v.abs() <= 0.72)
    mask = torch.zeros(side, side)
    mask[side - box:, side - box:] = (ring | stroke).float()
    return mask


def last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BenchError("trojan needs a model with a Conv2d layer to select neurons from")
    return convs[-1]


@register_attack("trojan")
class Trojan(Attack):
    """TrojanNN (Liu et al. 2018): a watermark-shaped trigger whose pixels are optimised to
    excite chosen internal neurons of a clean model.

    ``prepare`` takes the clean model of the same cell (the cached ``benign`` stage) and, in
    its last convolution layer, selects the ``neurons`` output channels with the strongest
    connection to the previous layer (largest sum of absolute incoming weights: the paper's
    criterion, which avoids neurons that are hard to drive). The pattern inside the mask is
    then optimised so those channels' mean activation approaches ``target_value``:
    loss = sum_j (target_value - a_j)^2, gradient steps restricted to the mask, pixels kept
    in [0, 1]. Where the paper starts from a blank image, we stamp the trigger on batches of
    clean training images, so it excites the neurons on the images it will be applied to.
    The paper then retrains the model on reverse-engineered data; under our protocol the
    optimised trigger poisons the training set (relabelled to the target) and the model is
    trained from scratch, as every other attack.

    ``optimize=False`` uses a fixed seeded uniform-noise pattern instead. ``pattern_source``
    ("optimised" or "fixed") records which was used; it is in ``details()`` and the stored
    attack state. The trigger is local: pixels outside the mask are never changed.
    """

    Config = TrojanConfig

    def __init__(self, config: TrojanConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        box = config.size or max(3, round(10 * info.side / 32))
        if box > info.side:
            raise BenchError(f"trojan trigger box {box} px is larger than the {info.side} px image")
        if config.mask == "watermark":
            mask = watermark_mask(info.side, box)
        else:
            mask = torch.zeros(info.side, info.side)
            mask[info.side - box:, info.side - box:] = 1.0
        self.mask = mask[None].expand(info.channels, -1, -1).contiguous()  # (C, H, W)
        self.pattern = torch.rand(info.shape, generator=self.generator("pattern")) * self.mask
        self.pattern_source = "fixed"
        self.neuron_indices = torch.empty(0, dtype=torch.long)
        # Mean activation of the chosen neurons on triggered clean images, before / after optimising.
        self.activation = {"initial": float("nan"), "optimised": float("nan")}

    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x.device, x.dtype)
        return x * (1 - mask) + self.pattern.to(x.device, x.dtype) * mask

    def prepare(self, train: ImageSet, ctx: AttackContext) -> None:
        if not self.config.optimize:
            return
        model = ctx.benign_model().eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        layer = last_conv(model)
        strength = layer.weight.detach().abs().sum(dim=(1, 2, 3))
        self.neuron_indices = torch.topk(strength, min(self.config.neurons, len(strength))).indices.sort().values.cpu()

        captured: dict[str, torch.Tensor] = {}
        hook = layer.register_forward_hook(lambda module, inputs, output: captured.__setitem__("out", output))
        neurons = self.neuron_indices.to(ctx.device)

        def activation(images: torch.Tensor) -> torch.Tensor:
            model(images)
            return captured["out"][:, neurons].float().mean(dim=(2, 3))  # (N, neurons)

        generator = self.generator("optimise")
        device = ctx.device
        mask = self.mask.to(device)
        pattern = self.pattern.to(device).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([pattern], lr=self.config.lr)
        try:
            with torch.no_grad():
                probe = to_unit(train.x[torch.randperm(len(train), generator=generator)[:self.config.batch_size].to(device)])
                before = activation(probe * (1 - mask) + pattern * mask).mean()
            for _ in range(self.config.steps):
                batch = torch.randint(0, len(train), (self.config.batch_size,), generator=generator).to(device)
                images = to_unit(train.x[batch])
                excite = activation(images * (1 - mask) + pattern * mask)
                loss = (self.config.target_value - excite).pow(2).sum(dim=1).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    pattern.clamp_(0, 1).mul_(mask)
            with torch.no_grad():
                after = activation(probe * (1 - mask) + pattern * mask).mean()
        finally:
            hook.remove()
        self.pattern = pattern.detach()
        self.pattern_source = "optimised"
        self.activation = {"initial": round(float(before), 4), "optimised": round(float(after), 4)}

    def details(self) -> dict:
        return {"pattern_source": self.pattern_source, "neurons": self.neuron_indices.tolist(),
                "mask_pixels": int(self.mask[0].sum()), "neuron_activation": self.activation}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern, "mask": self.mask, "neurons": self.neuron_indices,
                "optimised": torch.tensor(self.pattern_source == "optimised"),
                "activation": torch.tensor([self.activation["initial"], self.activation["optimised"]])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pattern = state["pattern"]
        self.mask = state["mask"]
        self.neuron_indices = state["neurons"].cpu()
        self.pattern_source = "optimised" if bool(state["optimised"]) else "fixed"
        if "activation" in state:
            initial, optimised = state["activation"].tolist()
            self.activation = {"initial": initial, "optimised": optimised}
