"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned on the clean reserve (10 epochs).
2. Student: the backdoored model trained on the reserve with cross-entropy plus, at
   several depths, the distance between its attention maps and the teacher's:
   loss = CE + sum_i beta_i * mean((A_s_i - A_t_i)^2), where A = the feature map's
   channel-mean of |f|^p, flattened and L2-normalised (p = 2, betas 500/1000/1000 for
   the paper's three residual groups, shallow to deep).

Which depths, for any architecture: the paper taps the outputs of the network's last
three stages (groups of layers at one spatial resolution). ``stage_outputs`` in
bench/units.py finds them in one probe forward pass: per spatial size a convolution
of the body outputs, the module (not a normalisation) whose output at that size is
computed last; the deepest ``len(betas)`` sizes are used. On PreAct-ResNet18 this picks
layer2/layer3/layer4 (the layers BackdoorBench taps), on timm's ConvNeXt stages.0-2, on
the small CNN the last ReLU at each resolution.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.errors import BenchError
from bench.registry import register_defense
from bench.units import stage_outputs


@dataclass
class NADConfig(DefenseConfig):
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)   # one per tapped stage, shallow to deep
    p: float = 2.0
    teacher_epochs: int = 10
    teacher_lr: float | None = None   # None: the profile's fine-tuning lr
    epochs: int | None = None         # student; None: the profile's fine-tuning epochs
    lr: float | None = None

    def __post_init__(self) -> None:
        if not self.betas:
            raise ValueError("betas must name at least one stage")
        require(self, betas=">= 0", p="> 0", teacher_epochs=">= 1", teacher_lr="> 0", epochs=">= 1", lr="> 0")


def attention_map(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(feature_map.float().abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTap:
    """Forward hooks that turn the chosen modules' outputs into attention maps, per forward."""

    def __init__(self, model: nn.Module, names: list[str], p: float) -> None:
        modules = dict(getattr(model, "body", model).named_modules())
        self.maps: dict[str, torch.Tensor] = {}
        # The map is computed inside the hook, from a fresh tensor, so a later in-place
        # activation cannot alter it or the tensors its gradient needs.
        self.handles = [modules[name].register_forward_hook(
            lambda m, i, o, name=name: self.maps.__setitem__(name, attention_map(o, p))) for name in names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@register_defense("nad")
class NeuralAttentionDistillation(Defense):
    """Fine-tune a teacher on the reserve, then distil its attention maps into the backdoored model."""

    Config = NADConfig
    kind = "post-training"
    version = "1"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: NADConfig = self.config
        student = ctx.model
        teacher = copy.deepcopy(student)
        teacher_recipe = ctx.finetune_recipe(epochs=cfg.teacher_epochs, lr=cfg.teacher_lr)
        teacher_history = engine.train(teacher, ctx.reserve, teacher_recipe, ctx.info, seed=ctx.seed,
                                       on_epoch_end=ctx.monitor, desc="nad teacher")
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

        layers = stage_outputs(student, ctx.reserve.x[:2], len(cfg.betas))
        if not layers:
            raise BenchError("nad found no convolutional feature maps to distil in this model")
        betas = cfg.betas[-len(layers):]  # fewer stages than betas: keep the deep ones' weights
        ctx.log(f"attention at {', '.join(layers)} with betas {betas}")

        student_tap = AttentionTap(student, layers, cfg.p)
        teacher_tap = AttentionTap(teacher, layers, cfg.p)

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher(x)
            loss = F.cross_entropy(model(x), y)
            for name, beta in zip(layers, betas):
                loss = loss + beta * (student_tap.maps[name] - teacher_tap.maps[name]).pow(2).mean()
            return loss

        recipe = ctx.finetune_recipe(epochs=cfg.epochs, lr=cfg.lr)
        try:
            history = engine.train(student, ctx.reserve, recipe, ctx.info, seed=ctx.seed + 1, loss_fn=loss_fn,
                                   on_epoch_end=ctx.monitor, desc="nad student")
        finally:
            student_tap.remove()
            teacher_tap.remove()
        for record in teacher_history:
            record["phase"] = "teacher"
        for record in history:
            record["phase"] = "student"
        details = {"layers": layers, "betas": list(betas), "p": cfg.p,
                   "teacher_epochs": teacher_recipe.epochs, "teacher_lr": teacher_recipe.lr,
                   "student_epochs": recipe.epochs, "student_lr": recipe.lr}
        return DefenseResult(model=student, history=teacher_history + history, details=details)
