"""Neural Cleanse (Wang et al., IEEE S&P 2019).

For every class t, reverse-engineer the smallest trigger that sends clean images to t:
a mask m (H x W, in [0, 1]) and a pattern p (C x H x W, in [0, 1]) stamped as
x' = (1 - m) * x + m * p, minimising CE(f(x'), t) + cost_t * |m|_1 on the clean reserve.
A backdoor target needs a far smaller mask than the other classes, so the L1 norms are
screened with the median absolute deviation: a class whose anomaly index
|norm - median| / (1.4826 * MAD) exceeds 2 and whose norm lies below the median is
flagged; a class whose reversed trigger never reached the attack-success threshold on
the reserve is not flagged (its norm still counts in the statistics). Mitigation unlearns the flagged triggers: fine-tune on the reserve with the
reversed trigger stamped on a share of each batch while the true label is kept.

As in the reference implementation, each cost_t adapts per epoch (starts at init_cost,
times 1.5 after ``patience`` epochs in which the trigger reached the attack-success
threshold, divided by 1.5^1.5 after ``patience`` epochs in which it did not), the best
mask is the smallest one seen while the threshold was met, and the optimiser is Adam with
lr 0.1. All classes are reversed together, in one batch of (classes x images), because
their problems are independent (separate parameters and separate loss terms; Adam is
per-coordinate); ``class_chunk`` bounds that batch. Departures: the optimisation runs a
fixed number of epochs instead of stopping early, and Adam keeps PyTorch's default betas
(the reference uses (0.5, 0.9); the shared engine has no betas setting, and adding one
would change the identity of every stored stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.config import require
from bench.defense import Defense, DefenseConfig, DefenseContext, DefenseResult
from bench.registry import register_defense

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's std


@dataclass
class NCConfig(DefenseConfig):
    # trigger reverse engineering
    re_epochs: int = 30              # passes over the reversal samples (the reference stops early, at most 1000)
    re_samples: int = 1000           # reserve images used for reversal (the reference: 1000)
    re_batch_size: int = 32          # images per class per step
    re_lr: float = 0.1               # Adam on the tanh-parametrised mask and pattern
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5     # up by this, down by this ** 1.5
    patience: int = 5                # epochs before the cost moves
    attack_succ_threshold: float = 0.99
    class_chunk: int = 10            # classes reversed together
    # outlier detection
    anomaly_threshold: float = 2.0
    # unlearning
    unlearn_ratio: float = 0.2       # share of each fine-tuning batch stamped with a reversed trigger
    epochs: int | None = None        # None: the profile's fine-tuning recipe
    lr: float | None = None

    def __post_init__(self) -> None:
        require(self, re_epochs=">= 1", re_samples=">= 1", re_batch_size=">= 1", re_lr="> 0", init_cost=">= 0",
                cost_multiplier="> 1", patience=">= 1", attack_succ_threshold="(0, 1]", class_chunk=">= 1",
                anomaly_threshold="> 0", unlearn_ratio="[0, 1]", epochs=">= 1", lr="> 0")


def median(values: torch.Tensor) -> torch.Tensor:
    """The usual median (the mean of the two middle values for an even count; torch.median takes the lower)."""
    return torch.quantile(values, 0.5)


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|x - median| / (1.4826 * MAD) per entry (the MAD-based outlier score of Neural Cleanse)."""
    norms = norms.double()
    deviation = (norms - median(norms)).abs()
    mad = MAD_CONSISTENCY * median(deviation)
    if mad == 0:  # more than half the values are equal: any other value is infinitely anomalous
        return torch.where(deviation > 0, torch.inf, 0.0).to(norms.dtype)
    return deviation / mad


def flag_outliers(norms: torch.Tensor, threshold: float = 2.0, valid: torch.Tensor | None = None) -> list[int]:
    """Classes whose trigger norm is an outlier on the small side (an unusually easy target)."""
    norms = norms.double()
    flagged = (anomaly_index(norms) > threshold) & (norms < median(norms))
    if valid is not None:
        flagged &= valid.to(flagged.device)
    return torch.nonzero(flagged).flatten().tolist()


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


class TriggerReversal:
    """Masks and patterns of a chunk of classes, with the reference's per-class cost schedule."""

    def __init__(self, classes: list[int], shape: tuple[int, int, int], cfg: NCConfig, device: torch.device,
                 generator: torch.Generator) -> None:
        k, (c, h, w) = len(classes), shape
        self.cfg = cfg
        self.targets = torch.tensor(classes, device=device)
        # tanh parametrisation keeps mask and pattern in [0, 1] without clipping; random start as in the reference.
        self.mask_param = torch.atanh((torch.rand(k, 1, h, w, generator=generator) - 0.5) * (2 - 1e-4)).to(device)
        self.pattern_param = torch.atanh((torch.rand(k, c, h, w, generator=generator) - 0.5) * (2 - 1e-4)).to(device)
        self.mask_param.requires_grad_(True)
        self.pattern_param.requires_grad_(True)
        self.cost = torch.full((k,), cfg.init_cost, device=device)
        self.up = torch.zeros(k, dtype=torch.long, device=device)
        self.down = torch.zeros(k, dtype=torch.long, device=device)
        self.best_norm = torch.full((k,), math.inf, device=device)
        self.best_mask = torch.zeros(k, 1, h, w, device=device)
        self.best_pattern = torch.zeros(k, c, h, w, device=device)
        self.correct = torch.zeros(k, device=device)
        self.seen = torch.zeros((), device=device)

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_param) / 2 + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_param) / 2 + 0.5

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        k, b = len(self.targets), len(x)
        mask, pattern = self.mask(), self.pattern()
        stamped = stamp(x.unsqueeze(0), mask.unsqueeze(1), pattern.unsqueeze(1)).flatten(0, 1)
        targets = self.targets.repeat_interleave(b)
        logits = model(stamped)
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, b).mean(1)
        with torch.no_grad():
            self.correct += (logits.argmax(1) == targets).view(k, b).float().sum(1)
            self.seen += b
        return (ce + self.cost * mask.flatten(1).sum(1)).sum()

    @torch.no_grad()
    def end_epoch(self) -> dict:
        cfg = self.cfg
        accuracy = self.correct / self.seen.clamp(min=1)
        norms = self.mask().flatten(1).sum(1)
        reached = accuracy >= cfg.attack_succ_threshold
        better = reached & (norms < self.best_norm)
        self.best_norm = torch.where(better, norms, self.best_norm)
        self.best_mask[better] = self.mask()[better]
        self.best_pattern[better] = self.pattern()[better]
        self.up = torch.where(reached, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(reached, torch.zeros_like(self.down), self.down + 1)
        raise_cost = self.up >= cfg.patience
        lower_cost = ~raise_cost & (self.down >= cfg.patience)
        self.cost = torch.where(raise_cost, self.cost * cfg.cost_multiplier, self.cost)
        self.cost = torch.where(lower_cost, self.cost / cfg.cost_multiplier ** 1.5, self.cost)
        self.up[raise_cost] = 0
        self.down[lower_cost] = 0
        self.correct.zero_()
        self.seen.zero_()
        return {"re_reached": int(reached.sum()), "re_mean_norm": float(norms.mean())}

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, pattern, L1 norm, reached) per class: the best trigger, or the last one if none met the threshold."""
        reached = torch.isfinite(self.best_norm)
        mask = torch.where(reached.view(-1, 1, 1, 1), self.best_mask, self.mask().detach())
        pattern = torch.where(reached.view(-1, 1, 1, 1), self.best_pattern, self.pattern().detach())
        return mask, pattern, mask.flatten(1).sum(1), reached


@register_defense("nc")
class NeuralCleanse(Defense):
    """Neural Cleanse (Wang et al. 2019): reverse-engineer a minimal trigger per class, flag MAD outliers, unlearn them."""

    Config = NCConfig
    kind = "post-training"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        cfg: NCConfig = self.config
        model = ctx.model
        masks, patterns, norms, reached, re_history = self._reverse_engineer(ctx, cfg)
        index = anomaly_index(norms.cpu())
        flagged = flag_outliers(norms.cpu(), cfg.anomaly_threshold, valid=reached.cpu())
        details = {"norms": [round(float(n), 3) for n in norms], "anomaly_index": [round(float(a), 3) for a in index],
                   "reached_threshold": reached.cpu().tolist(), "flagged_classes": flagged}
        tensors = {"masks": masks.cpu(), "patterns": patterns.cpu()}
        ctx.log(f"trigger norms {details['norms']}; flagged {flagged or 'nothing'}")
        if not flagged:
            details["action"] = "nothing flagged: model returned unchanged"
            return DefenseResult(model=model, history=re_history, details=details, tensors=tensors, unchanged=True)
        history = re_history + self._unlearn(ctx, cfg, masks[flagged], patterns[flagged])
        details["action"] = f"unlearned the reversed triggers of classes {flagged}"
        return DefenseResult(model=model, history=history, details=details, tensors=tensors)

    def _reverse_engineer(self, ctx: DefenseContext, cfg: NCConfig):
        model, reserve = ctx.model, ctx.reserve
        generator = torch.Generator().manual_seed(ctx.seed)
        sample = torch.randperm(len(reserve), generator=generator)[:cfg.re_samples]
        recipe = engine.TrainConfig(epochs=cfg.re_epochs, batch_size=cfg.re_batch_size, optimizer="adam", lr=cfg.re_lr,
                                    weight_decay=0.0, schedule="constant", augment=False, freeze_bn=True,
                                    amp=ctx.finetune_config.amp)
        classes = list(range(ctx.info.num_classes))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # the network is fixed; only the triggers learn
            p.requires_grad_(False)
        parts, history = [], []
        try:
            for start in range(0, len(classes), max(1, cfg.class_chunk)):
                chunk = classes[start:start + max(1, cfg.class_chunk)]
                reversal = TriggerReversal(chunk, ctx.info.shape, cfg, ctx.device, generator)

                def loss_fn(net, x, y, indices, reversal=reversal):
                    net.eval()
                    return reversal.loss(net, x)

                records = engine.train(model, reserve, recipe, ctx.info, seed=ctx.seed, loss_fn=loss_fn,
                                       on_epoch_end=lambda epoch, net, reversal=reversal: reversal.end_epoch(),
                                       parameters=[reversal.mask_param, reversal.pattern_param], indices=sample,
                                       desc=f"nc reverse {chunk[0]}-{chunk[-1]}")
                history += [{**r, "classes": f"{chunk[0]}-{chunk[-1]}"} for r in records]
                parts.append(reversal.result())
        finally:
            for p in params:
                p.requires_grad_(True)
        masks, patterns, norms, reached = (torch.cat(t) for t in zip(*parts))
        return masks, patterns, norms, reached, history

    def _unlearn(self, ctx: DefenseContext, cfg: NCConfig, masks: torch.Tensor, patterns: torch.Tensor) -> list[dict]:
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)

        def batch_hook(x, y, indices, epoch):
            chosen = torch.rand(len(x), device=x.device, generator=generator) < cfg.unlearn_ratio
            which = torch.randint(len(masks), (len(x),), device=x.device, generator=generator)
            stamped = stamp(x, masks[which], patterns[which])
            return torch.where(chosen.view(-1, 1, 1, 1), stamped, x), y

        recipe = ctx.finetune_recipe(epochs=cfg.epochs, lr=cfg.lr)
        return engine.train(ctx.model, ctx.reserve, recipe, ctx.info, seed=ctx.seed, batch_hook=batch_hook,
                            on_epoch_end=ctx.monitor, desc="nc unlearn")
