"""Profiles: named bundles of defaults (model, training recipe, fine-tuning recipe). Explicit options win."""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.engine import TrainConfig
from bench.registry import register_profile


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: str
    train: TrainConfig                 # the attack stage (undefended model)
    finetune: TrainConfig              # default recipe of defenses that fine-tune
    epochs_by_dataset: dict[str, int] = field(default_factory=dict)
    # Attack settings the recipe prescribes, before the user's -o overrides: a field name applies to
    # every attack whose Config has it (the paper's 5% poison rate); an attack's name holds settings
    # for that attack alone ({"input-aware": {"mask_epochs": 5}}), which win over the shared ones.
    attack_defaults: dict = field(default_factory=dict)
    # Per-defense settings that fit the profile's budget, keyed "defense" or "defense@attack"
    # (the latter wins on that attack's rows); the user's -o overrides win over both.
    defense_defaults: dict = field(default_factory=dict)
    eval_batch_size: int = 1024
    curve_samples: int = 1000          # test samples behind the per-epoch curves (0: no curves)
    # Metric settings that fit the profile's budget, keyed by metric name (bench/metrics/); the
    # user's -o metric.<name>.<field> overrides win.
    metric_defaults: dict = field(default_factory=dict)

    def attack_defaults_for(self, attack: str, fields: set[str]) -> dict:
        shared = {k: v for k, v in self.attack_defaults.items() if k in fields}
        return {**shared, **self.attack_defaults.get(attack, {})}

    def train_for(self, dataset: str) -> TrainConfig:
        from dataclasses import replace

        return replace(self.train, epochs=self.epochs_by_dataset.get(dataset, self.train.epochs))


def _define(profile: Profile) -> Profile:
    register_profile(profile.name)(profile)
    return profile


SMOKE = _define(Profile(
    name="smoke",
    description="seconds per cell on CPU: small CNN, few epochs; for tests on the synthetic dataset",
    model="small-cnn",
    train=TrainConfig(epochs=12, batch_size=128, lr=0.05, schedule="cosine"),
    finetune=TrainConfig(epochs=5, batch_size=128, lr=0.01, schedule="cosine"),
    curve_samples=500,
    defense_defaults={"none": {"finetune_epochs": 5}, "none@benign": {"rounds": 2}},
    metric_defaults={
        # tests ask for the scan where they test it
        "reasr": {"rows": "off", "steps": 60, "refine_steps": 20, "images_per_class": 5, "eval_images_per_class": 20},
        "selection": {"samples": 300},
        "features": {"samples": 100},
    },
))

QUICK = _define(Profile(
    name="quick",
    description="CPU-friendly: small CNN, 10 epochs, defenses fine-tune 5 epochs (its grid cost: BENCHMARKS.md)",
    # Chosen by reports/fidelity/: 11 of 23 published outcomes (3-seed means), as resnet8-w16 on one
    # seed, at 1/2.7 of its grid's cost. What it cannot rank is on the README's first screen.
    model="small-cnn",
    train=TrainConfig(epochs=10, batch_size=128, lr=0.05, schedule="cosine"),
    finetune=TrainConfig(epochs=5, batch_size=128, lr=0.01, schedule="cosine"),
    # NONE's presets fine-tune 20 (40 natural) epochs; the CPU budget keeps them to the profile's 5.
    defense_defaults={"none": {"finetune_epochs": 5}, "none@benign": {"rounds": 3}},
    # The attacker's mask generator is fitted for 5 epochs, not the paper's 25, in proportion to the
    # profile's 10 training epochs: the 25-epoch fit alone took longer than any other attack's stage.
    attack_defaults={"input-aware": {"mask_epochs": 5}},
    # 6 bounds x 10 labels x 50 images per step: 82 s per scan on 2 idle Zen 4 cores (2026-12-03; 260 s
    # on the Xeon of 2026-12-01); the benign row's 8-10 scans (unchanged models share one) add 11-14 min.
    metric_defaults={"reasr": {"steps": 100, "refine_steps": 50, "images_per_class": 5, "eval_images_per_class": 50}},
))

STANDARD = _define(Profile(
    name="standard",
    description="BackdoorBench-comparable: PreAct-ResNet18, SGD lr 0.01 m 0.9 wd 5e-4, batch 128, cosine; "
                "100 epochs (50 on GTSRB), defenses 20",
    model="preact-resnet18",
    train=TrainConfig(epochs=100, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    finetune=TrainConfig(epochs=20, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    epochs_by_dataset={"gtsrb": 50},
    eval_batch_size=512,
))

PAPER = _define(Profile(
    name="paper",
    description="NONE's recipe (Wang et al. 2022): CIFAR ResNet-18, SGD lr 0.1 m 0.9 wd 1e-4, batch 128, "
                "lr x0.1 every 80 epochs, 200 epochs, poison rate 0.05",
    model="resnet18",
    train=TrainConfig(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                      schedule="step", step_epochs=80, step_gamma=0.1),
    # The authors fine-tune with the same SGD at a constant lr; NONE sets its own lr and frozen
    # BatchNorm. 0.01 is for the other fine-tuning defenses (not from the paper).
    finetune=TrainConfig(epochs=20, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
                         schedule="constant"),
    attack_defaults={"poison_rate": 0.05},
    eval_batch_size=512,
))
