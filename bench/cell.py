"""Cells and their stages, as pure functions of a spec and the cached stages.

A *stage* is (dataset, model, attack, seed, profile): the undefended model, trained once
and reused by every defense. A *cell* is a stage plus a defense. Both are identified by
a stable hash of everything that determines their result, plugin versions included.
Running one writes artifacts under ``<artifacts>/<id>/`` (``bench.artifacts``: atomically,
with every file's sha256, verified before reuse) and returns its outcome; only the runner
writes the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape
from safetensors.torch import load_file, load_model, save_file, save_model

import bench
from bench import engine, metrics, progress
from bench.artifacts import ArtifactWriter, CorruptArtifact, finished, verify
from bench.attack import Attack, AttackContext
from bench.config import build_config
from bench.data.base import DatasetInfo, ImageSet, load_dataset
from bench.data.splits import make_splits
from bench.defense import Defense, DefenseContext
from bench.device import memory_format
from bench.models.base import build_model
from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS, source_hash


def _hash(payload: dict) -> str:
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
        return "s-" + _hash(payload)

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
    scan: dict | None = None   # bench.scan.ScanConfig fields when this cell measures REASR

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
        return "c-" + _hash(payload)

    def label(self) -> str:
        return f"{self.stage.label()} x {self.defense}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> "CellSpec":
        return CellSpec(StageSpec(**data["stage"]), data["defense"], data["defense_config"], data.get("scan"))


def environment(device: torch.device) -> dict[str, str]:
    import torchvision

    from bench.device import describe

    return {"bench": bench.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": describe(device), "host": platform.node()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Workspace:
    """Per-process state: the artifacts root, the device, and caches of device-resident data
    and triggered test sets (so many defenses of one stage reuse them)."""

    def __init__(self, artifacts_root: Path, device: torch.device) -> None:
        self.root = Path(artifacts_root)
        self.device = device
        self._datasets: dict[str, tuple[DatasetInfo, ImageSet, ImageSet]] = {}
        self._triggered: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def dataset(self, name: str) -> tuple[DatasetInfo, ImageSet, ImageSet]:
        if name not in self._datasets:
            info, train, test = load_dataset(name)
            self._datasets[name] = (info, train.to(self.device), test.to(self.device))
        return self._datasets[name]

    def split(self, spec: StageSpec) -> tuple[DatasetInfo, ImageSet, ImageSet, ImageSet]:
        """(info, reserve, train, test) for the stage's seed."""
        info, full, test = self.dataset(spec.dataset)
        splits = make_splits(full.y, spec.seed)
        return info, full.subset(splits.reserve), full.subset(splits.train), test

    def attack(self, spec: StageSpec) -> Attack:
        info = self.dataset(spec.dataset)[0]
        cls = ATTACKS.get(spec.attack)
        return cls(build_config(cls.Config, spec.attack_config), info, spec.seed)

    def triggered(self, spec: StageSpec, attack: Attack, test: ImageSet):
        if spec.id not in self._triggered:
            self._triggered.clear()  # one stage at a time is enough and bounds memory
            self._triggered[spec.id] = attack.triggered_test_set(test)
        return self._triggered[spec.id]

    def forget_triggered(self, spec: StageSpec) -> None:
        self._triggered.pop(spec.id, None)

    def stage_dir(self, spec: StageSpec) -> Path:
        return self.root / spec.id

    def load_stage(self, spec: StageSpec) -> tuple[torch.nn.Module, Attack, dict]:
        """The finished stage's undefended model and the attack with its learned state, from
        verified artifacts (CorruptArtifact when they are damaged or missing)."""
        directory = self.stage_dir(spec)
        result = verify(directory)
        info = self.dataset(spec.dataset)[0]
        model = build_model(spec.model, info).to(self.device)
        attack = self.attack(spec)
        try:
            load_model(model, str(directory / "model.safetensors"), device=str(self.device))
            model.to(memory_format=memory_format(self.device))  # the layout it was trained and evaluated in
            state_file = directory / "attack_state.safetensors"
            if state_file.is_file():
                attack.load_state_dict({k: v.to(self.device) for k, v in load_file(str(state_file)).items()})
        except Exception as exc:
            raise CorruptArtifact(directory, f"the checkpoint does not load ({exc.__class__.__name__}: {exc})") from None
        return model.eval(), attack, result


def ready_stage(spec: StageSpec, ws: Workspace) -> tuple[dict, torch.nn.Module, Attack]:
    """The stage's result, model and attack: reused when its artifacts are intact, (re)trained
    otherwise, including when they are damaged between the check and the load."""
    result = run_attack_stage(spec, ws)
    try:
        model, attack, _ = ws.load_stage(spec)
    except CorruptArtifact as exc:
        progress.log(f"[yellow]stage {spec.label()} could not be loaded ({exc.reason}): retraining it[/yellow]")
        shutil.rmtree(exc.directory, ignore_errors=True)
        result = run_attack_stage(spec, ws)
        model, attack, _ = ws.load_stage(spec)
    return result, model, attack


def evaluate(model: torch.nn.Module, attack: Attack, test: ImageSet, triggered, batch_size: int,
             limit: int | None = None) -> dict[str, float | None]:
    """C-ACC on the clean test set; ASR and RA on its triggered part (from predictions)."""
    x_clean, y_clean = (test.x, test.y) if limit is None else (test.x[:limit], test.y[:limit])
    result: dict[str, float | None] = {"c_acc": metrics.clean_accuracy(engine.predict(model, x_clean, batch_size), y_clean)}
    if attack.has_trigger:
        x_trig, y_true, y_target = triggered if limit is None else (t[:limit] for t in triggered)
        predictions = engine.predict(model, x_trig, batch_size)
        result["asr"] = metrics.attack_success_rate(predictions, y_target)
        result["ra"] = metrics.robust_accuracy(predictions, y_true)
    else:
        result["asr"] = result["ra"] = None
    return result


def curve_monitor(attack: Attack, test: ImageSet, triggered, spec: StageSpec):
    if spec.curve_samples <= 0:
        return None

    def monitor(epoch: int, model: torch.nn.Module) -> dict:
        # A trigger that trains with the model (triggered is None) is re-stamped on the curve subset.
        current = triggered if triggered is not None else attack.triggered_test_set(
            ImageSet(test.x[:spec.curve_samples], test.y[:spec.curve_samples]))
        return {f"test_{k}": v for k, v in evaluate(model, attack, test, current, spec.eval_batch_size,
                                                     limit=spec.curve_samples).items()}

    return monitor


def _train_config(data: dict) -> engine.TrainConfig:
    return build_config(engine.TrainConfig, data)


def wall_span(started_at: float) -> dict[str, float]:
    """When the work ran (epoch seconds), kept in the result: a resumed grid that reuses the
    artifact records when it was made, not when it was found again."""
    return {"started": started_at, "finished": time.time()}


def run_attack_stage(spec: StageSpec, ws: Workspace) -> dict:
    """Train the undefended model of a stage (or return the cached one's result)."""
    directory = ws.stage_dir(spec)
    cached = finished(directory, progress.log)
    if cached is not None:
        return cached
    started, started_at = time.perf_counter(), time.time()
    info, reserve, train, test = ws.split(spec)
    attack = ws.attack(spec)
    ctx = AttackContext(
        info=info, device=ws.device, seed=spec.seed, train_config=_train_config(spec.train),
        build_model=lambda: build_model(spec.model, info).to(ws.device),
        benign_model=lambda: _benign_model(spec, ws),
    )
    timings: dict[str, float] = {}
    attack.prepare(train, ctx)
    poisoned = attack.poison(train)
    timings["prepare_s"] = round(time.perf_counter() - started, 3)
    if attack.trigger_trained_with_model:
        triggered = None  # the trigger changes while the model trains: made after training
        ctx.on_epoch_end = curve_monitor(attack, test, None, spec)
    else:
        triggered = ws.triggered(spec, attack, test)
        ctx.on_epoch_end = curve_monitor(attack, test, triggered, spec)
    torch.manual_seed(spec.seed)
    model = ctx.build_model()
    writer = ArtifactWriter(directory)
    try:
        t0 = time.perf_counter()
        history = attack.train_model(model, poisoned, ctx)
        timings["train_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        if triggered is None:
            ws.forget_triggered(spec)
            triggered = ws.triggered(spec, attack, test)
        result_metrics = evaluate(model, attack, test, triggered, spec.eval_batch_size)
        timings["eval_s"] = round(time.perf_counter() - t0, 3)
        result_metrics.update(poison_rate=round(100 * poisoned.achieved_rate, 2), poisoned=len(poisoned.poisoned_indices))
        save_model(model, str(writer.tmp / "model.safetensors"))
        state = attack.state_dict()
        if state:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(writer.tmp / "attack_state.safetensors"))
        save_file({"poisoned_indices": poisoned.poisoned_indices.cpu().contiguous()}, str(writer.tmp / "poison.safetensors"))
        with open(writer.tmp / "history.json", "w") as handle:
            json.dump(history, handle)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        result = {"id": spec.id, "spec": dataclasses.asdict(spec), "metrics": result_metrics, "timings": timings,
                  "peak_memory_mb": peak_memory_mb(ws.device), "environment": environment(ws.device),
                  "details": {"requested_poison_rate": poisoned.requested_rate, **attack.details()},
                  "wall": wall_span(started_at)}
        result = writer.commit(result)
    except BaseException:
        writer.discard()
        raise
    return result


def _benign_model(spec: StageSpec, ws: Workspace) -> torch.nn.Module:
    return ready_stage(spec.benign(), ws)[1]


def poisoned_indices(ws: Workspace, spec: StageSpec) -> torch.Tensor:
    return load_file(str(ws.stage_dir(spec) / "poison.safetensors"))["poisoned_indices"]


def reverse_engineer(model: torch.nn.Module, test: ImageSet, info: DatasetInfo, scan_config: dict):
    """REASR of a model: (max over bounds, details per bound, reversed triggers as tensors)."""
    from bench.scan import ScanConfig, scan

    config = build_config(ScanConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in scan_config.items()})
    result = scan(model, test, info, config)
    details, tensors = result.to_json(), result.tensors()
    return result.max_reasr, details, tensors


def run_defense_cell(spec: CellSpec, ws: Workspace) -> dict:
    """Apply a defense to the cached undefended model of the cell's stage and evaluate it."""
    directory = ws.root / spec.id
    cached = finished(directory, progress.log)
    if cached is not None:
        return cached
    stage = spec.stage
    stage_result, undefended_model, attack = ready_stage(stage, ws)
    info, reserve, train, test = ws.split(stage)
    poisoned = attack.poison(train)  # deterministic: the same set the stage trained on
    triggered = ws.triggered(stage, attack, test)
    defense_cls = DEFENSES.get(spec.defense)
    defense: Defense = defense_cls(build_config(defense_cls.Config, spec.defense_config), stage.seed)
    started_at = time.time()
    writer = ArtifactWriter(directory)
    try:
        ctx = DefenseContext(
            model=undefended_model, build_model=lambda: build_model(stage.model, info).to(ws.device),
            train=poisoned.train, reserve=reserve, info=info, train_config=_train_config(stage.train),
            finetune_config=_train_config(stage.finetune), device=ws.device, seed=stage.seed,
            artifact_dir=writer.tmp, monitor=curve_monitor(attack, test, triggered, stage),
            log=lambda message: progress.log(escape(f"[{spec.defense}] {message}")),
        )
        if ws.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ws.device)
        torch.manual_seed(stage.seed)
        t0 = time.perf_counter()
        outcome = defense.run(ctx)
        defense_s = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        result_metrics = evaluate(outcome.model, attack, test, triggered, stage.eval_batch_size)
        eval_s = round(time.perf_counter() - t0, 3)
        undefended = stage_result["metrics"]
        if attack.has_trigger:
            result_metrics["der"] = metrics.defense_effectiveness_rating(
                undefended["asr"], result_metrics["asr"], undefended["c_acc"], result_metrics["c_acc"])
        else:
            result_metrics["der"] = None
        if outcome.flagged is not None:
            result_metrics.update(metrics.detection_metrics(outcome.flagged, poisoned.poisoned_indices, len(train)))
        scan_s = None
        if spec.scan is not None:
            t0 = time.perf_counter()
            result_metrics["reasr"], outcome.details["scan"], scan_tensors = reverse_engineer(outcome.model, test, info, spec.scan)
            save_file(scan_tensors, str(writer.tmp / "scan.safetensors"))
            scan_s = round(time.perf_counter() - t0, 3)
        if not outcome.unchanged:
            save_model(outcome.model, str(writer.tmp / "model.safetensors"))
        tensors = dict(outcome.tensors)
        if outcome.flagged is not None:
            tensors["flagged"] = outcome.flagged
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(writer.tmp / "defense.safetensors"))
        with open(writer.tmp / "history.json", "w") as handle:
            json.dump(outcome.history, handle, default=float)
        result = {"id": spec.id, "stage_id": stage.id, "spec": spec.to_json(), "metrics": result_metrics,
                  "undefended": {k: undefended.get(k) for k in ("c_acc", "asr", "ra")},
                  "timings": {"attack_s": stage_result["timings"].get("total_s"), "defense_s": defense_s, "eval_s": eval_s,
                              **({"scan_s": scan_s} if scan_s is not None else {})},
                  "peak_memory_mb": peak_memory_mb(ws.device), "environment": environment(ws.device),
                  "details": outcome.details, "wall": wall_span(started_at)}
        result = writer.commit(result)
    except BaseException:
        writer.discard()
        raise
    return result
