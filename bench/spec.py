"""What identifies a stage and a cell: the specs, and the stable hashes behind their ids.

A *stage* is (dataset, model, attack, seed, profile): the undefended model, trained once and
reused by every defense. A *cell* is a stage plus a defense. Both are identified by a stable
hash of everything that determines their result, plugin versions and plugin sources included,
so a finished result is reused exactly when it would be computed again the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import bench
from bench.config import require
from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS, source_hash


@dataclass
class EvalConfig:
    """What a cell measures besides the protocol's metrics; ``-o eval.<field>=...`` sets it, the
    profile's ``evaluation`` gives its defaults. 0 turns a measurement off."""

    # Triggered test images behind the selection-quality oracle (bench/metrics/selection.py),
    # measured for defenses that declare the units they ablate.
    oracle_samples: int = 1000
    # Clean and as many triggered test images whose penultimate features the cell stores, for the
    # report's t-SNE (bench/report/tsne.py draws them; it never rebuilds a model).
    feature_samples: int = 300

    def __post_init__(self) -> None:
        require(self, oracle_samples=">= 0", feature_samples=">= 0")


def content_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageSpec:
    dataset: str
    model: str
    attack: str
    attack_config: dict
    seed: int
    profile: str
    train: dict          # resolved engine.TrainConfig of the attack stage
    finetune: dict       # resolved engine.TrainConfig defenses start from
    eval_batch_size: int = 1024
    curve_samples: int = 1000

    @property
    def id(self) -> str:
        attack = ATTACKS.get(self.attack)
        payload = {**dataclasses.asdict(self), "attack_version": attack.version, "core_version": bench.STAGE_VERSION}
        model = None if self.model.startswith("timm:") else MODELS.get(self.model)
        sources = {kind: source_hash(obj) for kind, obj in
                   (("attack", attack), ("model", model), ("dataset", DATASETS.get(self.dataset))) if obj is not None}
        sources = {kind: digest for kind, digest in sources.items() if digest}
        if sources:  # plugins from outside the project: their code is part of the identity
            payload["plugin_sources"] = sources
        return "s-" + content_hash(payload)

    def benign(self) -> "StageSpec":
        benign_cls = ATTACKS.get("benign")
        return dataclasses.replace(self, attack="benign", attack_config=dataclasses.asdict(benign_cls.Config()))

    def label(self) -> str:
        return f"{self.dataset}/{self.model}/{self.attack}/seed{self.seed}"


@dataclass(frozen=True)
class CellSpec:
    stage: StageSpec
    defense: str
    defense_config: dict
    scan: dict | None = None   # bench.metrics.reasr.ScanConfig fields when this cell measures REASR
    evaluation: dict | None = None  # EvalConfig fields; None: none of its measurements
    # The fields the user set with -o, by section (attack, defense, train, finetune, eval), as
    # opposed to defaults: the report's primary variant of a defense is the one whose user set no
    # defense field, and its Reproduce command repeats exactly these. Not part of the id: the
    # resolved configs already determine the result.
    user_set: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        defense = DEFENSES.get(self.defense)
        payload = {"stage": self.stage.id, "defense": self.defense, "defense_config": self.defense_config,
                   "defense_version": defense.version, "core_version": bench.CELL_VERSION}
        if source_hash(defense):
            payload["plugin_source"] = source_hash(defense)
        if self.scan is not None:
            payload["scan"] = self.scan
            payload["scan_version"] = bench.SCAN_VERSION
        if self.evaluation is not None:
            payload["evaluation"] = self.evaluation
        return "c-" + content_hash(payload)

    def label(self) -> str:
        return f"{self.stage.label()} x {self.defense}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> "CellSpec":
        return CellSpec(StageSpec(**data["stage"]), data["defense"], data["defense_config"], data.get("scan"),
                        data.get("evaluation"), data.get("user_set") or {})
