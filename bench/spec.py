"""What identifies a stage and a cell: the specs, and the stable hashes behind their ids.

A *stage* is (dataset, model, attack, seed, profile): the undefended model, trained once and
reused by every defense. A *cell* is a stage plus a defense. Both are identified by a stable
hash of everything that determines their result, plugin versions and plugin sources included,
so a finished result is reused exactly when it would be computed again the same way. What a
cell measures (its metrics, bench/metric.py) is not part of its id: each metric has a key of its
own (``CellSpec.metric_keys``), so a new or changed metric is measured on the finished cells.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import bench
from bench.registry import ATTACKS, DATASETS, DEFENSES, METRICS, MODELS, source_hash


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
    # Which data the dataset's name stood for ("": the published dataset; bench/data/base.py,
    # ``dataset_variant``): a subset's results are never taken for the full dataset's.
    data_variant: str = ""

    @property
    def id(self) -> str:
        attack = ATTACKS.get(self.attack)
        payload = {**dataclasses.asdict(self), "attack_version": attack.version, "core_version": bench.STAGE_VERSION}
        if not self.data_variant:
            del payload["data_variant"]  # the published dataset keeps the ids it had before variants existed
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
    # The metrics measured on this cell: name -> its resolved Config fields. Not part of the id.
    metrics: dict = field(default_factory=dict)
    # The fields the user set with -o, by section (attack, defense, train, finetune, metric), as
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
        return "c-" + content_hash(payload)

    def metric_keys(self) -> dict[str, str]:
        """name -> the key of what that metric measures here (its version, settings and, for a
        plugin from outside the project, its source): a finished cell whose stored key differs
        is re-measured, without re-running its defense."""
        keys = {}
        for name, settings in self.metrics.items():
            metric = METRICS.get(name)
            payload = {"metric": name, "version": metric.version, "settings": settings}
            if source_hash(metric):
                payload["plugin_source"] = source_hash(metric)
            keys[name] = content_hash(payload)
        return keys

    def label(self) -> str:
        return f"{self.stage.label()} x {self.defense}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> "CellSpec":
        return CellSpec(StageSpec(**data["stage"]), data["defense"], data["defense_config"], data.get("metrics") or {},
                        data.get("user_set") or {})
