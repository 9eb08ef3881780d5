"""Trigger-inversion scanner: REASR, the natural-backdoor metric (protocol.md, "Natural backdoor").

In the spirit of ABS (Liu et al., CCS 2019) and K-Arm (Shen et al., ICML 2021): for each
candidate target label, optimise a universal trigger -- a mask ``m`` (1xHxW) and a pattern
``p`` (CxHxW), both sigmoid-parameterised -- so that stamped images
``x' = (1 - m) * x + m * p`` go to that label, while the mask's L1 norm stays within a bound
given as a fraction of the image area. REASR at a bound is the share of held-out images
(not of the candidate's class) that the best candidate's trigger sends to that label.

Design choices and why:
- Candidates are either all labels, or the labels that ABS-style neuron stimulation
  elevates (for many-class datasets, where inverting every label is too expensive).
- Every (bound, candidate) trigger is optimised in one batched tensor (chunked only to bound
  memory), so a scan is a few hundred large forward/backward passes, not a Python loop.
- With ``early_stop``, a trigger that already sends every optimisation image to its label
  within its bound leaves the batch (as K-Arm stops an arm that has converged), in the search
  and again in the refinement. It is off by default: it lowers REASR at the large bounds
  (measurements at ``ScanConfig.early_stop``).
- The size bound is a soft penalty during the search, then a hard projection (keep the
  top-k mask pixels, k = floor(bound * H * W)) followed by a refinement restricted to that
  support: the reported trigger satisfies the bound by construction, so REASR is never
  earned by a trigger larger than the bound says.
- REASR is measured on images never used for the optimisation: a trigger that only
  overfits its optimisation images is not a backdoor.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.data.base import DatasetInfo, ImageSet, to_unit
from bench.device import autocast
from bench.errors import BenchError
from bench.metric import Column, MeasureContext, Measurement, Metric
from bench.registry import register_metric
from bench.units import last_spatial_layer


@dataclass
class ScanConfig:
    bounds: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12)  # mask L1 as a fraction of the image area
    images_per_class: int = 10          # clean images per class used to optimise (at most half of each class)
    eval_images_per_class: int | None = 50  # held-out images per class that REASR is measured on (None: all the rest)
    steps: int = 300                    # optimisation steps per bound with the soft size penalty
    refine_steps: int = 100             # steps after the hard projection, on the kept support only
    lr: float = 0.2                     # Adam on the logits; 0.1 needed ~2x the steps to match (badnets smoke)
    penalty: float = 10.0               # weight of the (relative) excess of the mask's L1 over the bound
    candidates: Literal["all", "stimulation"] = "all"
    max_candidates: int = 10            # cap on labels picked by stimulation
    stimulation_layer: str | None = None  # module name (as in named_modules); None: the last spatial layer
    stimulation_values: int = 8         # stimulation levels from 0 to stimulation_scale x the layer's max
    stimulation_scale: float = 4.0
    # Images per forward pass (triggers x images). None: 512 on a CPU, 4096 on a GPU. The chunking
    # changes speed, never the triggers. A CPU is fastest with small passes that stay in its caches:
    # a quick benign scan took 130 s at 4096, 92 s at 1000, 82 s at 500, 87 s at 250 (2 Zen 4 cores).
    max_batch_images: int | None = None
    # A trigger stops optimising once, within its bound, it sends every optimisation image to its
    # label (K-Arm's early stop); the rest go on. Off by default: on a benign small-cnn (Fashion-MNIST,
    # quick scan) it saved 23% of the scan (100 s vs 130 s) but REASR at the 12% bound fell from 92.7
    # to 85.2 (stopped triggers generalise less to held-out images); requiring p >= 0.9 on every image
    # kept 86.6 and saved 7%. Worth it where a planted trigger converges in a few steps.
    early_stop: bool = False
    seed: int = 0
    # Which cells are scanned: the benign row's (natural backdoors; the default), every row, or none.
    # Not part of the scan's computation: cells that share a model share one scan whatever the rows.
    rows: Literal["benign", "all", "off"] = "benign"

    def __post_init__(self) -> None:
        self.bounds = tuple(float(b) for b in self.bounds)
        if not self.bounds or any(not 0.0 < b <= 1.0 for b in self.bounds):
            raise BenchError(f"scan bounds must be fractions of the image area in (0, 1], got {self.bounds}")
        if self.rows not in ("benign", "all", "off"):
            raise BenchError(f"scan rows must be 'benign', 'all' or 'off', got {self.rows!r}")
        if self.candidates not in ("all", "stimulation"):
            raise BenchError(f"scan candidates must be 'all' or 'stimulation', got {self.candidates!r}")
        if self.images_per_class < 1 or self.steps < 0 or self.refine_steps < 0 or self.max_candidates < 1:
            raise BenchError("scan needs images_per_class >= 1, max_candidates >= 1 and non-negative steps")
        if self.max_batch_images is not None and self.max_batch_images < 1:
            raise BenchError(f"scan max_batch_images must be >= 1 (or None for the device's default), got {self.max_batch_images}")


@dataclass
class ScanResult:
    bounds: tuple[float, ...]
    reasr: dict[float, float]           # bound -> REASR in percent (best candidate)
    # REASR's denominator: held-out images neither of the candidate's class nor already
    # predicted as it; a success is an image the stamped trigger moves to the candidate.
    best_label: dict[float, int]        # bound -> the best candidate label
    max_reasr: float                    # max over bounds, percent
    mean_reasr: float                   # mean over bounds: still informative when the max saturates
    masks: torch.Tensor                 # (bounds, 1, H, W): best candidate's mask per bound (CPU)
    patterns: torch.Tensor              # (bounds, C, H, W): best candidate's pattern per bound (CPU)
    candidates: list[int]               # labels that were inverted
    per_candidate: torch.Tensor         # (bounds, candidates) REASR in percent (CPU)
    mask_l1: dict[float, float]         # bound -> L1 of the reported mask as a fraction of the area
    opt_images: int                     # images used to optimise
    eval_images: int                    # held-out images REASR is measured on
    seconds: float
    stimulation: dict = field(default_factory=dict)  # layer, neuron scores (when candidates="stimulation")

    def to_json(self) -> dict:
        """A JSON-able summary for result files (bounds as strings: JSON keys)."""
        return {
            "bounds": list(self.bounds),
            "reasr": {f"{b:g}": round(v, 2) for b, v in self.reasr.items()},
            "best_label": {f"{b:g}": v for b, v in self.best_label.items()},
            "max_reasr": round(self.max_reasr, 2),
            "mean_reasr": round(self.mean_reasr, 2),
            "candidates": self.candidates,
            "per_candidate": [[round(v, 2) for v in row] for row in self.per_candidate.tolist()],
            "mask_l1": {f"{b:g}": round(v, 5) for b, v in self.mask_l1.items()},
            "opt_images": self.opt_images,
            "eval_images": self.eval_images,
            "seconds": round(self.seconds, 2),
            "stimulation": self.stimulation,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reversed triggers, for safetensors."""
        return {"scan_masks": self.masks.contiguous(), "scan_patterns": self.patterns.contiguous(),
                "scan_bounds": torch.tensor(self.bounds), "scan_per_candidate": self.per_candidate.contiguous()}


def batch_images(config: ScanConfig, device: torch.device) -> int:
    return config.max_batch_images or (4096 if device.type == "cuda" else 512)


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Every trigger on every image: x (N,C,H,W), masks (T,1,H,W), patterns (T,C,H,W) -> (T*N,C,H,W)."""
    stamped = (1 - masks).unsqueeze(1) * x.unsqueeze(0) + (masks * patterns).unsqueeze(1)
    return stamped.flatten(0, 1)


def split_images(labels: torch.Tensor, num_classes: int, config: ScanConfig, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded choice of optimisation indices and disjoint held-out indices (CPU)."""
    labels = labels.cpu()
    opt, held = [], []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_opt = min(config.images_per_class, len(members) // 2)
        rest = members[n_opt:]
        if config.eval_images_per_class is not None:
            rest = rest[:config.eval_images_per_class]
        opt.append(members[:n_opt])
        held.append(rest)
    opt_idx, held_idx = torch.cat(opt), torch.cat(held)
    if len(opt_idx) == 0 or len(held_idx) == 0:
        raise BenchError(f"scan needs at least two images of some class, got {len(labels)} images")
    return opt_idx, held_idx


def _gather(images: ImageSet, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    indices = indices.to(images.x.device)
    return to_unit(images.x[indices].to(device)), images.y[indices].to(device)


class _FrozenEval:
    """Eval mode and no parameter gradients for the scan; the model is restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.grad:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        for p, flag in self.grad:
            p.requires_grad_(flag)
        self.model.train(self.training)


# --- candidate labels by neuron stimulation (ABS) -----------------------------------------
def stimulation_candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                           config: ScanConfig) -> tuple[list[int], dict]:
    """ABS neuron stimulation: set one channel of an inner layer to a range of values on clean
    images and see which label it elevates. A neuron is suspicious when, on every image not of
    that label, some stimulation level makes that label win by a margin; its score is the
    smallest such margin over the images. Labels of the top-scoring neurons are the candidates."""
    layer = config.stimulation_layer or last_spatial_layer(model, x[:1])
    if layer is None:
        raise BenchError("stimulation needs a convolutional layer; use scan candidates='all' for this model")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise BenchError(f"stimulation layer {layer!r} is not a module of the model")
    module = modules[layer]
    captured: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    try:
        model(x)
    finally:
        hook.remove()
    activations = captured[0]
    n_neurons = activations.shape[1]
    levels = torch.linspace(0, config.stimulation_scale, config.stimulation_values, device=x.device)
    levels = levels * activations.amax().clamp_min(1e-6)
    n, v = len(x), len(levels)
    chunk = max(1, batch_images(config, x.device) // (n * v))
    state: dict[str, torch.Tensor] = {}

    def stimulate(mod, inp, out):
        out = out.clone()
        rows = torch.arange(len(out), device=out.device)
        out[rows, state["neuron"]] = state["value"].view(-1, 1, 1).to(out.dtype)
        return out

    own = y.view(1, -1, 1) == torch.arange(num_classes, device=x.device).view(1, 1, -1)  # (1, N, K)
    scores, labels = [], []
    hook = module.register_forward_hook(stimulate)
    try:
        for start in range(0, n_neurons, chunk):
            neurons = torch.arange(start, min(start + chunk, n_neurons), device=x.device)
            j = len(neurons)
            state["neuron"] = neurons.view(j, 1, 1).expand(j, v, n).reshape(-1)
            state["value"] = levels.view(1, v, 1).expand(j, v, n).reshape(-1)
            with autocast(x.device):
                logits = model(x.repeat(j * v, 1, 1, 1)).float().view(j, v, n, num_classes)
            top2 = logits.topk(2, dim=-1)
            winner = F.one_hot(top2.indices[..., 0], num_classes).bool()
            best_other = torch.where(winner, top2.values[..., 1:2], top2.values[..., 0:1])
            margin = (logits - best_other).amax(dim=1)                        # (J, N, K): best level
            margin = margin.masked_fill(own, float("inf")).amin(dim=1)        # (J, K): worst image
            score, label = margin.max(dim=1)
            scores.append(score)
            labels.append(label)
    finally:
        hook.remove()
    scores_t, labels_t = torch.cat(scores).cpu(), torch.cat(labels).cpu()
    chosen: list[int] = []
    for neuron in torch.argsort(scores_t, descending=True).tolist():
        label = int(labels_t[neuron])
        if label not in chosen:
            chosen.append(label)
        if len(chosen) == config.max_candidates:
            break
    top = torch.argsort(scores_t, descending=True)[:20].tolist()
    details = {"layer": layer, "top_neurons": [{"neuron": i, "label": int(labels_t[i]), "score": round(float(scores_t[i]), 4)}
                                               for i in top]}
    return chosen, details


# --- the inversion ------------------------------------------------------------------------
def _invert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, bound_px: torch.Tensor,
            config: ScanConfig, mask_noise: torch.Tensor, pattern_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one trigger per (label, bound) row, all together, from the rows' initial noise.
    Returns masks (T,1,H,W) and patterns (T,C,H,W)."""
    device = x.device
    t = len(labels)
    _, c, h, w = x.shape
    area = h * w
    start = torch.logit(torch.clamp(bound_px / area, 0.01, 0.5))
    mask_logit = (start.view(t, 1, 1, 1).cpu() + 0.1 * mask_noise).to(device)
    pattern_logit = pattern_noise.clone().to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr)
    # Images of a candidate's own class say nothing about a trigger towards it.
    weight = (y.view(1, -1) != labels.view(-1, 1)).float()
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1)
    counted = weight > 0
    support = torch.ones(t, 1, h, w, device=device)
    # Early stop: a row has converged when its trigger, within the bound, sends every counted
    # optimisation image to its label; it leaves the batch, kept as it was when it got there.
    # Without early stop none of this bookkeeping runs (no host syncs per step).
    early = config.early_stop
    done = torch.zeros(t, dtype=torch.bool, device=device)
    kept_mask, kept_pattern = (mask_logit.detach().clone(), pattern_logit.detach().clone()) if early else (None, None)

    def step(penalise: bool) -> None:
        rows = torch.nonzero(~done).flatten() if early else slice(None)
        row_labels, row_bounds = labels[rows], bound_px[rows]
        mask = torch.sigmoid(mask_logit[rows]) * support[rows]
        pattern = torch.sigmoid(pattern_logit[rows])
        with autocast(device):
            logits = model(stamp(x, mask, pattern))
        target = row_labels.view(-1, 1).expand(len(row_labels), len(x)).reshape(-1)
        ce = F.cross_entropy(logits.float(), target, reduction="none").view(len(row_labels), -1)
        loss = (ce * weight[rows]).sum()
        l1 = mask.flatten(1).sum(1)
        if penalise:
            loss = loss + config.penalty * (F.relu(l1 - row_bounds) / row_bounds).sum()
        if early:
            with torch.no_grad():
                hit = (logits.argmax(1).view(len(row_labels), -1) == row_labels.view(-1, 1)) | ~counted[rows]
                converged = rows[hit.all(1) & (l1 <= row_bounds + 1e-3)]
                kept_mask[converged], kept_pattern[converged] = mask_logit[converged], pattern_logit[converged]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if early:
            with torch.no_grad():  # Adam's momentum still moves rows without a gradient: put them back
                done[converged] = True
                mask_logit[done], pattern_logit[done] = kept_mask[done], kept_pattern[done]

    for _ in range(config.steps):
        if early and done.all():
            break
        step(True)
    # Hard projection: the k largest mask pixels, k the bound in whole pixels, so the final
    # L1 (a sum of k values in [0, 1]) cannot exceed the bound.
    with torch.no_grad():
        k = bound_px.floor().clamp_min(1).long()
        ranked = torch.sigmoid(mask_logit).flatten(1).argsort(dim=1, descending=True).argsort(dim=1)
        support = (ranked < k.view(-1, 1)).float().view(t, 1, h, w)
        # The kept pixels start fully opaque: the strongest stamp the bound allows, which the
        # refinement may then soften; a short search often leaves them far from opaque.
        mask_logit.copy_(torch.where(support.bool(), torch.full_like(mask_logit, 3.0), mask_logit))
        done.zero_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr)
    for _ in range(config.refine_steps):
        if early and done.all():
            break
        step(False)
    with torch.no_grad():
        return (torch.sigmoid(mask_logit) * support).detach(), torch.sigmoid(pattern_logit).detach()


@torch.no_grad()
def _success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
             patterns: torch.Tensor, max_batch: int) -> torch.Tensor:
    """Per trigger, the share (percent) of held-out images not of its label that it sends to its label.

    Images the model already assigns to that label without any trigger are left out: the
    trigger did not send them there, and counting them would credit clean errors (a model
    that predicts one label for everything would score 100% with an empty trigger)."""
    rates = []
    chunk = max(1, max_batch // len(x))
    with autocast(x.device):
        clean = torch.cat([model(x[i:i + max_batch]).argmax(1) for i in range(0, len(x), max_batch)])
    for start in range(0, len(labels), chunk):
        lab = labels[start:start + chunk]
        with autocast(x.device):
            pred = model(stamp(x, masks[start:start + chunk], patterns[start:start + chunk])).argmax(1)
        pred = pred.view(len(lab), len(x))
        valid = (y.view(1, -1) != lab.view(-1, 1)) & (clean.view(1, -1) != lab.view(-1, 1))
        hits = ((pred == lab.view(-1, 1)) & valid).sum(1).float()
        rates.append(100 * hits / valid.sum(1).clamp_min(1).float())
    return torch.cat(rates)


def scan(model: nn.Module, images: ImageSet, info: DatasetInfo, config: ScanConfig | None = None) -> ScanResult:
    """Invert triggers for the candidate labels at every bound and report REASR per bound.

    ``model`` takes float images in [0, 1] (it normalises internally); ``images`` should be
    clean (test or reserve). The model is left as it was (mode and requires_grad). The best
    candidate per bound is the one with the highest held-out success, as REASR is defined
    ("the strongest trigger found"); with ~10 candidates this max adds at most a few points
    of selection bias on a few hundred held-out images.
    """
    config = config or ScanConfig()
    started = time.perf_counter()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    opt_idx, held_idx = split_images(images.y, info.num_classes, config, generator)
    # Images are taken as stored: the set is expected to be clean (test or reserve), so a
    # per-batch poisoning transform is deliberately not applied.
    x_opt, y_opt = _gather(images, opt_idx, device)
    x_eval, y_eval = _gather(images, held_idx, device)
    area = info.shape[1] * info.shape[2]
    with _FrozenEval(model):
        stimulation: dict = {}
        if config.candidates == "stimulation":
            candidates, stimulation = stimulation_candidates(model, x_opt, y_opt, info.num_classes, config)
        else:
            candidates = list(range(info.num_classes))
        n_bounds, n_cand = len(config.bounds), len(candidates)
        # Rows are (bound, candidate) pairs, bound-major, so row i belongs to bound i // n_cand.
        labels = torch.tensor(candidates, device=device).repeat(n_bounds)
        bound_px = torch.tensor(config.bounds, device=device).repeat_interleave(n_cand) * area
        # Every row's starting point is drawn up front: the rows are independent (one loss term and
        # Adam state each), so how they are chunked changes the speed, not the triggers.
        _, c, h, w = x_opt.shape
        mask_noise = torch.randn(len(labels), 1, h, w, generator=generator)
        pattern_noise = torch.randn(len(labels), c, h, w, generator=generator)
        chunk = max(1, batch_images(config, device) // len(x_opt))
        masks, patterns = [], []
        with torch.enable_grad():
            for start in range(0, len(labels), chunk):
                rows = slice(start, start + chunk)
                m, p = _invert(model, x_opt, y_opt, labels[rows], bound_px[rows], config, mask_noise[rows],
                               pattern_noise[rows])
                masks.append(m)
                patterns.append(p)
        masks_t, patterns_t = torch.cat(masks), torch.cat(patterns)
        rates = _success(model, x_eval, y_eval, labels, masks_t, patterns_t, batch_images(config, device))
    rates = rates.view(n_bounds, n_cand).cpu()
    best = rates.argmax(dim=1)
    rows = torch.arange(n_bounds) * n_cand + best
    best_masks, best_patterns = masks_t[rows.to(device)].cpu(), patterns_t[rows.to(device)].cpu()
    reasr = {b: float(rates[i, best[i]]) for i, b in enumerate(config.bounds)}
    return ScanResult(
        bounds=config.bounds,
        reasr=reasr,
        best_label={b: candidates[int(best[i])] for i, b in enumerate(config.bounds)},
        max_reasr=max(reasr.values()),
        mean_reasr=sum(reasr.values()) / len(reasr),
        masks=best_masks,
        patterns=best_patterns,
        candidates=candidates,
        per_candidate=rates,
        mask_l1={b: float(best_masks[i].sum()) / area for i, b in enumerate(config.bounds)},
        opt_images=len(x_opt),
        eval_images=len(x_eval),
        seconds=time.perf_counter() - started,
        stimulation=stimulation,
    )


def _computation(config: ScanConfig) -> dict:
    """The settings that determine a scan's result (``rows`` only chooses the cells)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items() if k != "rows"}


@register_metric("reasr")
class Reasr(Metric):
    """REASR by trigger inversion: how much of held-out data a small reversed trigger sends to one label.

    Measured on the rows ``rows`` names (the benign row by default: the natural-backdoor measure).
    The reversed triggers are stored in the cell's
    ``scan.safetensors``. A model its defense left unchanged is the stage's own, and a scan is a
    deterministic function of the model and its settings: it is computed once per stage and
    settings (``Workspace.shared_result``) and every such cell reuses it; on the benign row that is
    the undefended cell and each defense that found nothing to change (CLP, NC)."""

    Config = ScanConfig
    version = "3"  # 3: a metric plugin (the scan itself is unchanged since 2)
    title = "REASR (trigger inversion)"
    description = "max over mask-size bounds of the inverted trigger's success on held-out images"
    columns = (Column("reasr", "REASR", "lower", description=description),)

    def applies(self, cell) -> bool:
        rows = self.config.rows
        return rows == "all" or (rows == "benign" and cell.stage.attack == "benign")

    def measure(self, ctx: MeasureContext) -> Measurement:
        from safetensors.torch import save_file

        def compute(directory) -> dict:
            result = scan(ctx.model, ctx.test, ctx.info, self.config)
            save_file(result.tensors(), str(directory / "scan.safetensors"))
            return {"reasr": result.max_reasr, "details": result.to_json()}

        if not ctx.unchanged:
            computed = compute(ctx.out_dir)
            return Measurement({"reasr": computed["reasr"]}, computed["details"])
        shared, directory = ctx.shared.shared_result(ctx.spec.stage, "reasr", _computation(self.config), compute)
        shutil.copyfile(directory / "scan.safetensors", ctx.out_dir / "scan.safetensors")
        return Measurement({"reasr": shared["reasr"]}, {**shared["details"], "shared": directory.name})
