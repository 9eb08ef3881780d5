"""The one training loop and the one evaluation pass that every attack and defense uses."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench import progress
from bench.config import require
from bench.data.augment import augment
from bench.data.base import DatasetInfo, ImageSet, to_unit
from bench.device import autocast, memory_format
from bench.errors import BenchError


class NonFiniteLoss(BenchError):
    """Training produced a NaN/inf loss: the cell fails rather than report a broken model."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 80      # step schedule: multiply lr by step_gamma every step_epochs
    step_gamma: float = 0.1
    augment: bool = True
    freeze_bn: bool = False    # BatchNorm in eval mode: running statistics frozen, gamma/beta still learn
    amp: bool = True           # bf16 autocast, CUDA only
    compile: bool = False      # torch.compile the model for training (helps large models on GPUs; measure first)

    def __post_init__(self) -> None:
        require(self, epochs=">= 1", batch_size=">= 1", lr="> 0", momentum="[0, 1)", weight_decay=">= 0",
                step_epochs=">= 1", step_gamma="(0, 1]")


# loss_fn(model, x, y, indices) -> scalar loss; the default is cross-entropy.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# batch_hook(x, y, indices, epoch) -> (x, y): runs after augmentation and the data's own transform.
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# on_epoch_end(epoch, model) -> extra numbers for the training curve (never used for decisions).
EpochCallback = Callable[[int, nn.Module], dict]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def make_optimizer(parameters: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, progress_fraction: float, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress_fraction))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (epoch // cfg.step_epochs)
    return cfg.lr


def set_bn_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _unit_float_batches(x: torch.Tensor, batch_size: int, device: torch.device):
    """uint8 or [0, 1] float images as [0, 1] float batches on ``device``."""
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].to(device)
        yield to_unit(batch)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> None:
    """Set every BatchNorm's running statistics to their averages over ``x`` (uint8 or [0, 1]
    float images; each batch weighs the same). Running averages lag behind weights that are still
    moving when training stops at a high learning rate, and a module used in eval mode then
    behaves unlike the one that was trained."""
    torch.optim.swa_utils.update_bn(_unit_float_batches(x, batch_size, next(model.parameters()).device), model)
    model.eval()


def train(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    info: DatasetInfo,
    *,
    seed: int,
    loss_fn: LossFn = cross_entropy,
    batch_hook: BatchHook | None = None,
    on_epoch_end: EpochCallback | None = None,
    parameters: Iterable | None = None,
    indices: torch.Tensor | None = None,
    extra_optimizers: Iterable[torch.optim.Optimizer] = (),
    desc: str = "train",
) -> list[dict]:
    """Train ``model`` in place on ``data`` (uint8 on the model's device); returns one record per epoch.

    ``indices`` restricts training to a subset (e.g. samples a defense kept); the data's
    own ``schedule`` (slow poisoning) further selects per epoch. ``extra_optimizers`` update
    auxiliary modules that ``loss_fn`` trains alongside the model with their own rule (e.g.
    Input-Aware's trigger generator, Adam in its paper); their learning rates follow the
    model's schedule, scaled from the rates they were created with.
    """
    extra_optimizers = list(extra_optimizers)
    extra_base_lrs = [[group["lr"] for group in extra.param_groups] for extra in extra_optimizers]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # sample order, on the host
    device_generator = torch.Generator(device=device).manual_seed(seed)  # augmentation, on the device
    model.to(memory_format=memory_format(device))
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(parameters if parameters is not None else model.parameters(), cfg)
    base = torch.arange(len(data)) if indices is None else indices.cpu()
    history: list[dict] = []
    with progress.task(desc, cfg.epochs) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            if cfg.freeze_bn:
                set_bn_eval(model)
            pool = base
            if data.schedule is not None:
                active = torch.zeros(len(data), dtype=torch.bool)
                active[data.schedule(epoch, cfg.epochs).cpu()] = True
                pool = base[active[base]]
            order = pool[torch.randperm(len(pool), generator=generator)].to(device)  # one copy per epoch
            steps = max(1, math.ceil(len(order) / cfg.batch_size))
            total_loss = torch.zeros((), device=device)
            seen = 0
            started = time.perf_counter()
            for step in range(steps):
                lr = lr_at(cfg, (epoch + step / steps) / cfg.epochs, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for extra, base_lrs in zip(extra_optimizers, extra_base_lrs):
                    for group, base_lr in zip(extra.param_groups, base_lrs):
                        group["lr"] = base_lr * lr / cfg.lr if cfg.lr > 0 else base_lr
                batch_idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                if len(batch_idx) == 0:
                    continue
                x = to_unit(data.x[batch_idx])
                y = data.y[batch_idx]
                if cfg.augment:
                    x = augment(x, padding=info.crop_padding, hflip=info.hflip, generator=device_generator)
                if data.transform is not None:
                    x, y = data.transform(x, y, batch_idx)
                if batch_hook is not None:
                    x, y = batch_hook(x, y, batch_idx, epoch)
                x = x.contiguous(memory_format=memory_format(device))
                with autocast(device, cfg.amp):
                    loss = loss_fn(step_model, x, y, batch_idx)
                optimizer.zero_grad(set_to_none=True)
                for extra in extra_optimizers:
                    extra.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for extra in extra_optimizers:
                    extra.step()
                total_loss += loss.detach() * len(batch_idx)
                seen += len(batch_idx)
            mean_loss = (total_loss / max(seen, 1)).item()  # the one host sync per epoch
            seconds = time.perf_counter() - started
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"{desc}: loss became {mean_loss} in epoch {epoch + 1} (lr {cfg.lr:g}); "
                                    "lower the learning rate")
            record = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr, "samples": seen,
                      "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch + 1, model))
            history.append(record)
            bar.advance(1, loss=f"{mean_loss:.3f}", img_s=f"{record['images_per_s']:.0f}")
    model.eval()
    return history


@torch.no_grad()
def infer(model: nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
          batch_size: int = 1024, *, amp: bool = True) -> torch.Tensor:
    """``fn`` (default: the model itself) over uint8 or [0, 1] float images, batched, in eval mode,
    in the layout the model trains in, concatenated along the batch."""
    device = next(model.parameters()).device
    model.to(memory_format=memory_format(device))  # the layout it trained in: results do not depend on how it was loaded
    fn = fn or model
    was_training = model.training
    model.eval()
    outputs = []
    for batch in _unit_float_batches(x, batch_size, device):
        with autocast(device, amp):
            outputs.append(fn(batch.contiguous(memory_format=memory_format(device))))
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, device=device)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, *, amp: bool = True) -> torch.Tensor:
    """Predicted labels for uint8 or [0, 1] float images, batched, in eval mode."""
    if len(x) == 0:
        return torch.empty(0, dtype=torch.long, device=next(model.parameters()).device)
    return infer(model, x, lambda batch: model(batch).argmax(1), batch_size, amp=amp)
