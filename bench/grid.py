"""From names and ``-o`` overrides to the list of cells: the grid, with sweeps expanded."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bench.config import build_config, expand_sweeps, parse_field_values, parse_override
from bench.data.base import dataset_variant
from bench.engine import TrainConfig
from bench.errors import BenchError
from bench.registry import ATTACKS, DATASETS, DEFENSES, METRICS, MODELS, PROFILES
from bench.spec import CellSpec, StageSpec

OVERRIDE_SECTIONS = ("attack", "defense", "train", "finetune", "metric")


@dataclass
class GridRequest:
    dataset: str
    profile: str = "quick"
    model: str | None = None            # None: the profile's model
    attacks: list[str] | None = None    # None: every registered attack
    defenses: list[str] | None = None   # None: every registered defense
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)


@dataclass
class ParsedOverrides:
    attack: dict[str, dict[str, list]] = field(default_factory=dict)    # name -> field -> values
    defense: dict[str, dict[str, list]] = field(default_factory=dict)
    train: dict[str, list] = field(default_factory=dict)
    finetune: dict[str, list] = field(default_factory=dict)
    metric: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> field -> one value (no sweep)


def parse_overrides(texts: list[str]) -> ParsedOverrides:
    parsed = ParsedOverrides()
    for text in texts:
        key, value = parse_override(text)
        parts = key.split(".")
        section = parts[0]
        if section in ("attack", "defense"):
            if len(parts) != 3:
                raise BenchError(f"bad override {key!r}: expected {section}.<name>.<field>=value")
            registry = ATTACKS if section == "attack" else DEFENSES
            plugin = registry.get(parts[1])
            values = parse_field_values(plugin.Config, parts[2], value, key)
            getattr(parsed, section).setdefault(parts[1], {})[parts[2]] = values
        elif section in ("train", "finetune"):
            if len(parts) != 2:
                raise BenchError(f"bad override {key!r}: expected {section}.<field>=value")
            getattr(parsed, section)[parts[1]] = parse_field_values(TrainConfig, parts[1], value, key)
        elif section == "metric":
            if len(parts) != 3:
                raise BenchError(f"bad override {key!r}: expected metric.<name>.<field>=value")
            values = parse_field_values(METRICS.get(parts[1]).Config, parts[2], value, key)
            if len(values) != 1:
                # a metric is not part of a cell's identity: two values would be two answers for one cell
                raise BenchError(f"bad override {key!r}: metric.{parts[1]}.{parts[2]} takes one value, not a sweep")
            parsed.metric.setdefault(parts[1], {})[parts[2]] = values[0]
        else:
            raise BenchError(f"bad override {key!r}: the section must be one of {', '.join(OVERRIDE_SECTIONS)}")
    return parsed


def _validate_model(name: str) -> None:
    if not name.startswith("timm:"):
        MODELS.get(name)


def _recipe(base: TrainConfig, values: dict, section: str) -> dict:
    """The profile's recipe with the user's values, validated (``train.epochs=0`` is refused here)."""
    return dataclasses.asdict(build_config(TrainConfig, {**dataclasses.asdict(base), **values}, f"{section}."))


def stage_specs(request: GridRequest, parsed: ParsedOverrides, attack: str) -> list[tuple[StageSpec, dict]]:
    """The attack's stages, each with the fields the user set for it (attack, train, finetune)."""
    profile = PROFILES.get(request.profile)
    num_classes = DATASETS.get(request.dataset).info.num_classes
    variant = dataset_variant(request.dataset)
    model = request.model or profile.model
    _validate_model(model)
    attack_cls = ATTACKS.get(attack)
    specs = []
    attack_fields = {f.name for f in dataclasses.fields(attack_cls.Config)}
    profile_defaults = profile.attack_defaults_for(attack, attack_fields)
    for attack_values in expand_sweeps(parsed.attack.get(attack, {})):
        attack_config = dataclasses.asdict(build_config(attack_cls.Config, {**profile_defaults, **attack_values},
                                                        f"attack.{attack}."))
        target = attack_config.get("target")
        if isinstance(target, int) and target >= num_classes:
            raise BenchError(f"invalid attack.{attack}.target={target}: {request.dataset} has classes 0..{num_classes - 1}")
        for train_values in expand_sweeps(parsed.train):
            train = _recipe(profile.train_for(request.dataset), train_values, "train")
            for finetune_values in expand_sweeps(parsed.finetune):
                finetune = _recipe(profile.finetune, finetune_values, "finetune")
                user_set = {"attack": dict(attack_values), "train": dict(train_values), "finetune": dict(finetune_values)}
                for seed in request.seeds:
                    specs.append((StageSpec(request.dataset, model, attack, attack_config, seed, profile.name,
                                            train, finetune, profile.eval_batch_size, profile.curve_samples, variant),
                                   user_set))
    return specs


def metric_instances(request: GridRequest, parsed: ParsedOverrides) -> dict[str, object]:
    """Every registered metric with its settings: its Config's defaults, then the profile's
    (``Profile.metric_defaults``), then the user's ``-o metric.<name>.<field>``."""
    profile = PROFILES.get(request.profile)
    instances = {}
    for name, metric_cls in METRICS.items():
        values = {**profile.metric_defaults.get(name, {}), **parsed.metric.get(name, {})}
        instances[name] = metric_cls(build_config(metric_cls.Config, values, f"metric.{name}."))
    return instances


def cell_metrics(instances: dict[str, object], cell: CellSpec) -> dict[str, dict]:
    """name -> resolved settings of the metrics that apply to the cell."""
    return {name: dataclasses.asdict(metric.config) for name, metric in instances.items() if metric.applies(cell)}


def defense_defaults(defense_cls, defense: str, attack: str, profile) -> dict:
    """The defense's own per-attack defaults, then the profile's, then (by the caller) the user's."""
    fields = {f.name for f in dataclasses.fields(defense_cls.Config)}
    merged = {**defense_cls.defaults_for_attack.get(attack, {}), **profile.defense_defaults.get(defense, {}),
              **profile.defense_defaults.get(f"{defense}@{attack}", {})}
    return {k: v for k, v in merged.items() if k in fields}


def expand(request: GridRequest) -> list[CellSpec]:
    """Every cell of the grid, stages in order so each stage's defenses follow it."""
    parsed = parse_overrides(request.overrides)
    attacks = ATTACKS.names() if request.attacks is None else list(dict.fromkeys(request.attacks))
    defenses = DEFENSES.names() if request.defenses is None else list(dict.fromkeys(request.defenses))
    seeds = list(dict.fromkeys(request.seeds))
    for kind, chosen, valid in (("attack", attacks, ATTACKS.names()), ("defense", defenses, DEFENSES.names())):
        if not chosen:
            raise BenchError(f"no {kind} selected; valid: {', '.join(valid)}")
    if not seeds:
        raise BenchError("no seed selected: give at least one, e.g. --seeds 0")
    request = dataclasses.replace(request, seeds=seeds)
    for name in defenses:
        DEFENSES.get(name)
    for name in list(parsed.defense):
        if name not in defenses:
            raise BenchError(f"override for defense {name!r}, which is not in the grid ({', '.join(defenses)})")
    for name in list(parsed.metric):
        METRICS.get(name)
    for name in list(parsed.attack):
        if name not in attacks:
            raise BenchError(f"override for attack {name!r}, which is not in the grid ({', '.join(attacks)})")
    metrics = metric_instances(request, parsed)
    cells = []
    for attack in attacks:
        for stage, stage_user_set in stage_specs(request, parsed, attack):
            for defense in defenses:
                defense_cls = DEFENSES.get(defense)
                base = defense_defaults(defense_cls, defense, attack, PROFILES.get(request.profile))
                for values in expand_sweeps(parsed.defense.get(defense, {})):
                    config = build_config(defense_cls.Config, {**base, **values}, f"defense.{defense}.")
                    try:
                        defense_cls.check(config, TrainConfig(**stage.train), TrainConfig(**stage.finetune))
                    except ValueError as exc:
                        raise BenchError(f"invalid defense.{defense} settings: {exc}") from None
                    cell = CellSpec(stage, defense, dataclasses.asdict(config),
                                    user_set={**stage_user_set, "defense": dict(values), "metric": parsed.metric})
                    cells.append(dataclasses.replace(cell, metrics=cell_metrics(metrics, cell)))
    return cells
