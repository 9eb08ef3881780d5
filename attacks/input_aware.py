from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.attack import Attack, AttackConfig, AttackContext, Poisoned
from bench.config import require
from bench.data.base import ImageSet, to_unit
from bench.device import memory_format
from bench.errors import BenchError
from bench.registry import register_attack

EPSILON = 1e-7


@dataclass
class InputAwareConfig(AttackConfig):
    cross_rate: float = 0.1        # fraction of the training set that gets cross triggers (true label kept)
    lambda_div: float = 1.0        # weight of the diversity loss
    mask_density: float = 0.032    # mask values above this are penalised while the mask generator is fitted
    lambda_norm: float = 100.0     # weight of that mask-size penalty (and of the floor below)
    # Every image's mask must cover at least this fraction of the image (0: no floor). Without it the
    # fit can leave images with an empty mask, which no classifier can learn a trigger from. On the
    # synthetic set (seed 0), 0.016 gave ASR 76% and 0.024 gave 94% (0.032: 89%); see the smoke test.
    mask_floor: float = 0.024
    mask_epochs: int = 25          # epochs that fit the mask generator before the joint training
    mask_lr: float = 0.01          # Adam step size of the mask-generator fit
    generator_lr: float = 0.01     # Adam step size of the pattern generator in the joint training
    # Channels of the generators' first stage (doubled per down-sampling). None: the paper's
    # sizes, 16 for MNIST-sized images (<= 28 px) and 32 for CIFAR-sized and larger ones.
    width: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, cross_rate="[0, 1]", lambda_div=">= 0", mask_density="(0, 1]", lambda_norm=">= 0",
                mask_floor="[0, 1]", mask_epochs=">= 0", mask_lr="> 0", generator_lr="> 0", width=">= 1")
        if self.poison_rate + self.cross_rate > 1.0:
            raise ValueError("poison_rate + cross_rate must be <= 1")
        if self.mask_floor > self.mask_density:
            raise ValueError("mask_floor must be in [0, mask_density]")


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Generator(nn.Module):
    """Encoder-decoder (the paper's trigger/mask generator shape): two conv blocks per level,
    max-pool down and bilinear up-sampling, output squashed to [0, 1]."""

    def __init__(self, channels_in: int, channels_out: int, side: int, width: int) -> None:
        super().__init__()
        depth = 0
        while depth < 3 and side % (2 ** (depth + 1)) == 0 and side // 2 ** (depth + 1) >= 4:
            depth += 1
        layers: list[nn.Module] = []
        c = channels_in
        for level in range(depth):
            layers += _conv_block(c, width * 2 ** level) + _conv_block(width * 2 ** level, width * 2 ** level)
            layers.append(nn.MaxPool2d(2))
            c = width * 2 ** level
        layers += _conv_block(c, width * 2 ** depth)
        c = width * 2 ** depth
        for level in reversed(range(depth)):
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            layers += _conv_block(c, width * 2 ** level) + _conv_block(width * 2 ** level, width * 2 ** level)
            c = width * 2 ** level
        layers.append(nn.Conv2d(c, channels_out, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x).float()) / (2 + EPSILON) + 0.5


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The square root's slope is infinite at 0: two identical patterns (the diversity loss drives the
    # generator's outputs to 0 or 1, and two saturated patterns can coincide) would make the gradient
    # NaN. Below 1e-12 the pair gets no gradient instead (Fashion-MNIST, quick: NaN in epoch 1 without).
    return (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12).sqrt()


def diversity_loss(x: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """||x1 - x2|| / ||g(x1) - g(x2)|| over pairs (each image with the next of the batch,
    which is a random other image since batches are shuffled): distinct inputs must get
    distinct triggers."""
    return (_distance(x, x.roll(1, 0)) / (_distance(generated, generated.roll(1, 0)) + EPSILON)).mean()


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """A steep, differentiable step at 0.5: masks become nearly binary."""
    return torch.tanh((mask - 0.5) * 20) / (2 + EPSILON) + 0.5


@register_attack("input-aware")
class InputAware(Attack):
    """Input-Aware dynamic backdoor (Nguyen & Tran 2020): every image gets its own trigger
    from a generator, B(x) = x (1 - m(x)) + g(x) m(x).

    The attacker controls training, as in the paper (inside ``train_model``, on ``engine.train``):
    1. The mask generator m is fitted alone for ``mask_epochs`` with the diversity loss on
       (thresholded) masks plus ``lambda_norm`` * mean(relu(m(x) - mask_density)), which keeps
       masks small (Adam, lr x0.1 after epochs 10 and 20, as in the paper),
       and our addition, a floor: each image's mask must cover at least ``mask_floor`` of the
       image (the paper's loss allows an empty mask, and an image without a trigger cannot be
       attacked; synthetic smoke set, seed 0: ASR 69.6% without the floor, 94.1% with it).
    2. The classifier and the pattern generator g are trained jointly in one loop (the
       classifier with the stage's recipe, g with Adam as in the paper, on the same schedule;
       m frozen and thresholded). Each batch draws its roles afresh: a ``poison_rate`` share
       gets its own trigger and the target label, a ``cross_rate`` share gets the trigger
       generated from another image of the batch and keeps its true label (so a trigger
       only works on the image it was made for), the rest stays clean. The loss is
       cross-entropy plus ``lambda_div`` x the diversity loss ||x1 - x2|| / ||g(x1) - g(x2)||.
       As in the paper's training step, the generators see only the images whose triggers are
       used (the backdoor samples and the cross samples' sources), and the diversity loss pairs
       those: a fifth of each batch at the default rates, which makes the joint training about
       three times cheaper than generating for every image (Fashion-MNIST, small-cnn, CPU).
    After each of the two trainings, the generator's BatchNorm statistics are recomputed on the
    clean training set, since the generators are used in eval mode from then on.

    What the attacker delivers (``poison``) is the training set with a ``transform`` that
    stamps the final generators' triggers, per batch, on fixed recorded sets: the
    ``poisoned_indices`` (own trigger, relabelled to the target) and ``cross_rate`` x N
    other samples (cross trigger, true label). A defense that retrains on it sees the
    attacker's kind of training data, and detection metrics have ground truth; the
    undefended model itself was trained with the per-batch draws above. The generators'
    weights are the attack's state, so the test-time trigger is recreated exactly.
    All-to-all and slow poisoning are supported (slow: the per-batch backdoor share follows
    the ramp of ``Attack.slow_schedule``, and the delivered set carries that schedule).
    """

    Config = InputAwareConfig
    # 2: mask fit on normalised image distances, with the paper's step schedule; 3: mask floor, BatchNorm
    # recalibration; 4: the generators see only the images whose triggers are used, as in the paper
    version = "4"
    trigger_trained_with_model = True

    def __init__(self, config: InputAwareConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=self.generator("init"))))
            width = config.width or (16 if info.side <= 28 else 32)
            self.pattern_generator = Generator(info.channels, info.channels, info.side, width)
            self.mask_generator = Generator(info.channels, 1, info.side, width)
        self.pattern_generator.eval()
        self.mask_generator.eval()
        self._clean_train: ImageSet | None = None  # set by poison(): train_model trains on the clean set
        self.mask_fraction = float("nan")  # mean thresholded mask on training images, after training
        self.mask_loss = float("nan")

    # --- the trigger -------------------------------------------------------------------
    def _generators_to(self, device: torch.device) -> None:
        # One weight layout wherever the generators run: convolutions round differently in
        # channels_last (the engine's) and contiguous (a fresh module's) layouts, and a reloaded
        # attack must stamp bit for bit the trigger the stage trained with.
        for generator in (self.pattern_generator, self.mask_generator):
            generator.to(device=device, memory_format=memory_format(device))

    def stamp(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The trigger generated from ``source`` stamped on ``x`` (source is x, or another image for cross samples)."""
        mask = threshold(self.mask_generator(source))
        return x * (1 - mask) + self.pattern_generator(source) * mask

    @staticmethod
    def trigger_sources(role: torch.Tensor) -> torch.Tensor:
        """Batch positions whose image's trigger is used, for roles (0 clean, 1 own trigger,
        2 cross trigger: that of the previous image in the batch, a random other image since
        batches are shuffled). Only these go through the generators: a fifth of a batch at the
        default rates, as in the paper's training step, where the generators see only the
        backdoor and cross samples."""
        return torch.nonzero(((role == 1) | (role == 2).roll(-1, 0)).flatten()).flatten()

    def _stamp_roles(self, x: torch.Tensor, role: torch.Tensor, sources: torch.Tensor, source_images: torch.Tensor,
                     patterns: torch.Tensor) -> torch.Tensor:
        """The batch with every role applied: ``patterns`` (and the frozen mask generator's masks)
        come from ``source_images`` (``x[sources]``); clean images pass through unchanged."""
        with torch.no_grad():
            masks = torch.zeros_like(x[:, :1]).index_copy(0, sources, threshold(self.mask_generator(source_images)))
        patterns = torch.zeros_like(x).index_copy(0, sources, patterns)
        own = x * (1 - masks) + patterns * masks
        cross_masks = masks.roll(1, 0)
        cross = x * (1 - cross_masks) + patterns.roll(1, 0) * cross_masks
        role = role.view(-1, 1, 1, 1)
        return torch.where(role == 1, own, torch.where(role == 2, cross, x))

    @torch.no_grad()
    def apply_trigger(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._generators_to(x.device)
        self.pattern_generator.eval()
        self.mask_generator.eval()
        return self.stamp(x, x).clamp(0, 1)

    # --- poisoning ---------------------------------------------------------------------
    def choose_cross_indices(self, y: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
        eligible = torch.ones(len(y), dtype=torch.bool)
        eligible[poisoned] = False
        candidates = torch.nonzero(eligible).flatten()
        count = round(self.config.cross_rate * len(y))
        return torch.sort(candidates[torch.randperm(len(candidates), generator=self.generator("cross"))[:count]]).values

    def _roles(self, num_samples: int, poisoned: torch.Tensor, cross: torch.Tensor, device: torch.device) -> torch.Tensor:
        # A lookup of each sample's role (0 clean, 1 backdoor, 2 cross), kept on the images' device.
        role = torch.zeros(num_samples, dtype=torch.uint8)
        role[poisoned] = 1
        role[cross] = 2
        return role.to(device)

    def poison(self, train: ImageSet) -> Poisoned:
        self._clean_train = ImageSet(train.x, train.y)  # the attacker's own training (train_model) starts from it
        indices = self.choose_poison_indices(train.y)
        cross = self.choose_cross_indices(train.y, indices)
        role = self._roles(len(train), indices, cross, train.x.device)
        y = train.y.clone()
        on_device = indices.to(y.device)
        y[on_device] = self.target_labels(y[on_device])

        @torch.no_grad()
        def transform(x: torch.Tensor, labels: torch.Tensor, batch_indices: torch.Tensor):
            self._generators_to(x.device)
            self.pattern_generator.eval()
            self.mask_generator.eval()
            batch_role = role[batch_indices]
            sources = self.trigger_sources(batch_role)
            if len(sources) == 0:
                return x, labels
            source_images = x[sources]
            stamped = self._stamp_roles(x, batch_role, sources, source_images, self.pattern_generator(source_images))
            return stamped.clamp(0, 1), labels

        schedule = self.slow_schedule(len(y), indices) if self.config.schedule == "slow" else None
        return Poisoned(ImageSet(train.x, y, transform=transform, schedule=schedule), indices,
                        self.config.poison_rate, len(indices) / max(len(y), 1))

    # --- the attack stage --------------------------------------------------------------
    def train_model(self, model: nn.Module, poisoned: Poisoned, ctx: AttackContext) -> list[dict]:
        cfg = self.config
        self._generators_to(ctx.device)
        clean = self._clean_train
        if clean is None:
            raise BenchError("input-aware: poison() must run before train_model()")
        mask_history: list[dict] = []
        if cfg.mask_epochs > 0:
            mean = torch.tensor(ctx.info.mean, device=ctx.device).view(1, -1, 1, 1)
            std = torch.tensor(ctx.info.std, device=ctx.device).view(1, -1, 1, 1)

            floor_pixels = max(1, round(cfg.mask_floor * ctx.info.side ** 2)) if cfg.mask_floor > 0 else 0

            def mask_loss(mask_generator: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                raw = mask_generator(x)
                masks = threshold(raw)
                size = F.relu(masks - cfg.mask_density).mean()
                # Image distances in the classifier's normalised units, as the paper measures them:
                # masks are in [0, 1], so this scale sets how large masks grow against lambda_norm.
                loss = cfg.lambda_div * diversity_loss((x - mean) / std, masks) + cfg.lambda_norm * size
                if floor_pixels:
                    # The floor acts before the threshold, whose gradient vanishes on an empty mask: each
                    # image's floor_pixels-th largest raw value is pushed over 0.6 (thresholded: 0.98).
                    kth = raw.flatten(1).topk(floor_pixels, dim=1).values[:, -1]
                    loss = loss + cfg.lambda_norm * F.relu(0.6 - kth).mean()
                return loss

            # The paper's schedule for the mask generator: Adam, lr x0.1 after epochs 10 and 20 (of 25); a
            # shorter fit runs at the constant lr. At a constant lr a long fit can diverge late: on the
            # synthetic set (width 8, seed 0) masks jumped from ~3% of the image to 20-57% from epoch 22 on.
            mask_recipe = replace(ctx.train_config, epochs=cfg.mask_epochs, optimizer="adam", lr=cfg.mask_lr,
                                  weight_decay=0.0, schedule="step", step_epochs=10, step_gamma=0.1)
            mask_history = engine.train(self.mask_generator, clean, mask_recipe, ctx.info, seed=ctx.seed + 1,
                                        loss_fn=mask_loss, desc="attack input-aware: mask generator")
            # Measured on the synthetic set (width 8, 10 epochs at a constant lr): with the running
            # statistics the fit left, 27% of the masks were empty in eval mode against 0% in train mode.
            engine.recalibrate_batchnorm(self.mask_generator, clean.x)
        self.mask_generator.eval()
        for parameter in self.mask_generator.parameters():
            parameter.requires_grad_(False)

        # As in the paper, each batch draws its backdoor and cross samples afresh, so every
        # image is seen with its own trigger, with another's, and clean: the classifier must
        # learn that a trigger works only on the image it was made for.
        batch_roles: dict[str, torch.Tensor] = {}
        ramp_epochs = max(1, math.ceil(ctx.train_config.epochs / 2))

        def draw_roles(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int):
            backdoor_rate = cfg.poison_rate
            if cfg.schedule == "slow":  # the same ramp as Attack.slow_schedule, on the per-batch share
                backdoor_rate *= min(1.0, (epoch + 1) / ramp_epochs)
            draw = torch.rand(len(y), device=y.device)
            role = torch.where(draw < backdoor_rate, 1, torch.where(draw < backdoor_rate + cfg.cross_rate, 2, 0))
            batch_roles["role"] = role
            return x, torch.where(role == 1, self.target_labels(y), y)

        def joint_loss(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            role = batch_roles["role"]
            sources = self.trigger_sources(role)
            if len(sources) < 2:  # no pair to keep apart (a short last batch); the classifier still learns
                return F.cross_entropy(classifier(x), y)
            self.pattern_generator.train()
            source_images = x[sources]
            patterns = self.pattern_generator(source_images)
            inputs = self._stamp_roles(x, role, sources, source_images, patterns)
            return F.cross_entropy(classifier(inputs), y) + cfg.lambda_div * diversity_loss(source_images, patterns)

        # The classifier follows the stage's recipe; the generator its paper's Adam (betas 0.5, 0.9).
        generator_optimizer = torch.optim.Adam(self.pattern_generator.parameters(), lr=cfg.generator_lr, betas=(0.5, 0.9))
        history = engine.train(model, clean, ctx.train_config, ctx.info, seed=ctx.seed, loss_fn=joint_loss,
                               batch_hook=draw_roles, extra_optimizers=[generator_optimizer],
                               on_epoch_end=self._eval_mode_callback(ctx.on_epoch_end), desc="attack input-aware")
        engine.recalibrate_batchnorm(self.pattern_generator, clean.x)
        with torch.no_grad():
            probe = to_unit(clean.x[: min(len(clean), 512)])
            self.mask_fraction = round(float(threshold(self.mask_generator(probe)).mean()), 4)
        self.mask_loss = round(mask_history[-1]["loss"], 4) if mask_history else float("nan")
        return history

    def details(self) -> dict:
        return {"mask_fraction": self.mask_fraction, "mask_fit_final_loss": self.mask_loss}

    def _eval_mode_callback(self, callback):
        if callback is None:
            return None

        def wrapped(epoch: int, model: nn.Module) -> dict:
            self.pattern_generator.eval()  # the test curve measures the trigger as it will be used
            try:
                return callback(epoch, model)
            finally:
                self.pattern_generator.train()

        return wrapped

    # --- learned state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"pattern.{k}": v for k, v in self.pattern_generator.state_dict().items()}
        state.update({f"mask.{k}": v for k, v in self.mask_generator.state_dict().items()})
        state["stats"] = torch.tensor([self.mask_fraction, self.mask_loss])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(state.values())).device
        self._generators_to(device)
        self.pattern_generator.load_state_dict({k[len("pattern."):]: v for k, v in state.items() if k.startswith("pattern.")})
        self.mask_generator.load_state_dict({k[len("mask."):]: v for k, v in state.items() if k.startswith("mask.")})
        self.pattern_generator.eval()
        self.mask_generator.eval()
        if "stats" in state:
            self.mask_fraction, self.mask_loss = state["stats"].tolist()
