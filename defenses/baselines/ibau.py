"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

Backdoor removal as a minimax on the clean reserve:

    min_theta  max_delta  H(delta, theta) = 1/n sum_i L(f_theta(x_i + delta), y_i)

with one universal perturbation delta standing in for the unknown trigger. Each round
first solves the inner maximisation (one pass of gradient ascent on delta over the
reserve), then takes outer steps on theta with the *implicit hypergradient*, which also
accounts for how the worst-case delta moves with theta:

    dH/dtheta = dH/dtheta|_delta + (dPhi/dtheta)^T (I - dPhi/ddelta)^-T dH/ddelta,

where Phi(delta, theta) = delta - step * grad_delta L_inner is the fixed-point map of the
inner problem (L_inner = -CE + reg * ||delta||^2). The inverse is approximated by the
fixed-point (Neumann series) iteration v <- (dPhi/ddelta)^T v + dH/ddelta, K times, as in
the authors' code. The outer step is an ordinary ``engine.train`` step whose loss is a
surrogate with exactly that gradient: H + <v, Phi(delta, theta)> (v and delta detached).

Settings follow the authors' implementation: 5 rounds, K = 5, Adam on theta (lr 1e-4,
BackdoorBench's value; the authors' script uses 1e-3), SGD lr 10 for delta, fixed-point step 0.1, ||delta||^2 weight 1e-3, the network in
evaluation mode throughout, and the outer loss patching delta onto a small ``portion`` of
each batch (0.01, at least one image) while the rest keeps the clean loss. Two changes
for our setting: the inner loss of the fixed-point map uses the current batch (the
reference reuses the first batch), and the inner ascent uses the reserve's true labels.
The paper bounds ||delta||; the authors' code leaves that projection (radius 10) commented
out, so delta is unbounded by default and ``radius`` restores the bound. delta lives in
pixel space ([0, 1] images, before the model's normalisation), as in the authors' code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.config import require
from bench.data.base import to_unit
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.registry import register_defense


@dataclass
class IBAUConfig(DefenseConfig):
    rounds: int = 5                 # alternations of inner maximisation and outer unlearning
    K: int = 5                      # fixed-point iterations of the implicit hypergradient
    lr: float = 1e-4                # Adam on the network (outer problem)
    batch_size: int | None = None   # None: the profile's fine-tuning batch size
    outer_epochs: int = 1           # passes over the reserve per round (the reference: one)
    inner_lr: float = 10.0          # SGD on the universal perturbation (inner problem)
    fixed_point_step: float = 0.1   # step of the fixed-point map delta - step * grad L_inner
    reg: float = 1e-3               # weight of ||delta||^2 in the inner loss
    radius: float = 0.0             # project delta onto ||delta||_2 <= radius (pixel scale); 0: unbounded
    portion: float = 0.01           # share of each outer batch that carries delta (at least one image)
    augment: bool = False           # the reference unlearns on fixed, unaugmented batches

    def __post_init__(self) -> None:
        require(self, rounds=">= 1", K=">= 1", lr="> 0", batch_size=">= 1", outer_epochs=">= 1", inner_lr="> 0",
                fixed_point_step="> 0", reg=">= 0", radius=">= 0", portion="(0, 1]")


def inner_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, reg: float) -> torch.Tensor:
    """What delta minimises: the negative loss of the perturbed batch plus a norm penalty."""
    return -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()


@torch.no_grad()
def project(delta: torch.Tensor, radius: float) -> None:
    """Scale delta back onto the L2 ball of the given radius, in place and without a host sync."""
    if radius > 0:
        delta.mul_((radius / delta.norm().clamp(min=1e-12)).clamp(max=1.0))


@register_defense("ibau")
class IBAU(Defense):
    """I-BAU (Zeng et al. 2022): minimax unlearning of a universal perturbation with implicit hypergradients."""

    Config = IBAUConfig
    kind = "post-training"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: IBAUConfig = self.config
        model = ctx.model
        reserve = ctx.reserve
        batch_size = cfg.batch_size or ctx.finetune_config.batch_size
        amp = ctx.finetune_config.amp
        params = [p for p in model.parameters() if p.requires_grad]
        history: list[dict] = []
        rounds: list[dict] = []
        for round_index in range(cfg.rounds):
            delta = self._inner_maximisation(model, params, reserve, ctx, cfg, batch_size, amp, round_index)
            before = self._reserve_under(model, reserve, delta)
            outer = engine.TrainConfig(epochs=cfg.outer_epochs, batch_size=batch_size, optimizer="adam", lr=cfg.lr,
                                       weight_decay=0.0, schedule="constant", augment=cfg.augment, freeze_bn=True,
                                       amp=amp)
            records = engine.train(model, reserve, outer, ctx.info, seed=ctx.seed + round_index,
                                   loss_fn=self._hypergradient_loss(delta, cfg), on_epoch_end=ctx.monitor,
                                   parameters=params, desc=f"ibau round {round_index + 1}")
            for record in records:
                record["round"] = round_index + 1
            history += records
            after = self._reserve_under(model, reserve, delta)
            rounds.append({"round": round_index + 1, "delta_l2": round(float(delta.norm()), 4),
                           "reserve_acc_under_delta": before[0], "dominant_class": before[1],
                           "dominant_share": before[2], "reserve_acc_under_delta_after": after[0]})
            ctx.log(f"round {round_index + 1}: |delta|={rounds[-1]['delta_l2']:.3f}, reserve acc under delta "
                    f"{before[0]:.1f}% -> {after[0]:.1f}%")
        return DefenseResult(model=model, history=history, details={"rounds": rounds})

    @staticmethod
    def _inner_maximisation(model, params, reserve, ctx, cfg, batch_size, amp, round_index) -> torch.Tensor:
        """One pass of ascent on a fresh universal perturbation; the network is not updated."""
        delta = torch.zeros((1, *ctx.info.shape), device=ctx.device, requires_grad=True)

        def loss_fn(net, x, y, indices):
            net.eval()
            project(delta, cfg.radius)  # projected ascent: the previous step may have left the ball
            return inner_loss(net, x, y, delta, cfg.reg)

        recipe = engine.TrainConfig(epochs=1, batch_size=batch_size, optimizer="sgd", lr=cfg.inner_lr, momentum=0.0,
                                    weight_decay=0.0, schedule="constant", augment=False, freeze_bn=True, amp=amp)
        for p in params:  # gradients of the network's weights are not needed here
            p.requires_grad_(False)
        try:
            engine.train(model, reserve, recipe, ctx.info, seed=ctx.seed + 1000 + round_index, loss_fn=loss_fn,
                         parameters=[delta], desc=f"ibau perturbation {round_index + 1}")
        finally:
            for p in params:
                p.requires_grad_(True)
        project(delta, cfg.radius)
        return delta.detach()

    @staticmethod
    def _hypergradient_loss(delta: torch.Tensor, cfg: IBAUConfig):
        def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            net.eval()
            d = delta.detach().requires_grad_(True)
            carriers = max(1, math.ceil(cfg.portion * len(x))) if cfg.portion > 0 else 0
            patch = torch.zeros(len(x), device=x.device, dtype=x.dtype)
            patch[torch.randperm(len(x), device=x.device)[:carriers]] = 1
            outer = F.cross_entropy(net(x + patch.view(-1, 1, 1, 1) * d), y)
            (grad_outer_delta,) = torch.autograd.grad(outer, d, retain_graph=True)
            (grad_inner,) = torch.autograd.grad(inner_loss(net, x, y, d, cfg.reg), d, create_graph=True)
            mapped = d - cfg.fixed_point_step * grad_inner
            v = torch.zeros_like(d)
            for _ in range(cfg.K):
                (jv,) = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)
                v = jv + grad_outer_delta
            implicit = (mapped * v.detach()).sum()
            # The gradient is that of outer + implicit; the value reported stays the outer loss.
            return outer + implicit - implicit.detach()

        return loss_fn

    @staticmethod
    @torch.no_grad()
    def _reserve_under(model: nn.Module, reserve, delta: torch.Tensor) -> tuple[float, int, float]:
        """Reserve accuracy with delta added, the class delta sends most images to, and that share (percent)."""
        x = to_unit(reserve.x) + delta
        predictions = engine.predict(model, x)
        counts = torch.bincount(predictions, minlength=1)
        dominant = int(counts.argmax())
        return (round(100 * float((predictions == reserve.y).float().mean()), 2), dominant,
                round(100 * float(counts[dominant]) / max(len(predictions), 1), 2))
