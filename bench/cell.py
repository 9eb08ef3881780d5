"""The two pipelines: train a stage's undefended model, and apply one defense to it (a cell).

Each is a pure function of its spec (bench/spec.py) and the cached stages. Running one writes
artifacts under ``<artifacts>/<id>/`` (bench/artifacts.py: atomically, with every file's sha256,
verified before reuse) and returns its outcome; only the runner writes the store. What a cell
measures is computed here from model predictions, by the functions of ``bench.metrics``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import torch
from rich.markup import escape
from safetensors.torch import load_file, save_file, save_model

from bench import engine, progress
from bench.artifacts import ArtifactWriter, CorruptArtifact, finished
from bench.attack import Attack, AttackContext
from bench.config import build_config
from bench.data.base import DatasetInfo, ImageSet
from bench.defense import Defense, DefenseContext, DefenseResult
from bench.metrics import accuracy
from bench.models.base import build_model
from bench.registry import DEFENSES
from bench.spec import CellSpec, EvalConfig, StageSpec, content_hash
from bench.workspace import Workspace, environment, peak_memory_mb


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
    result: dict[str, float | None] = {"c_acc": accuracy.clean_accuracy(engine.predict(model, x_clean, batch_size), y_clean)}
    if attack.has_trigger:
        x_trig, y_true, y_target = triggered if limit is None else (t[:limit] for t in triggered)
        predictions = engine.predict(model, x_trig, batch_size)
        result["asr"] = accuracy.attack_success_rate(predictions, y_target)
        result["ra"] = accuracy.robust_accuracy(predictions, y_true)
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
    from bench.metrics.reasr import ScanConfig, scan

    config = build_config(ScanConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in scan_config.items()})
    result = scan(model, test, info, config)
    details, tensors = result.to_json(), result.tensors()
    return result.max_reasr, details, tensors


def scan_cell_model(outcome: DefenseResult, stage: StageSpec, ws: Workspace, test: ImageSet, info: DatasetInfo,
                    scan_config: dict, out_dir) -> tuple[float, dict]:
    """REASR of the cell's model, with its reversed triggers written to ``out_dir/scan.safetensors``.

    A model the defense left unchanged is the stage's own, and a scan is a deterministic function of
    the model and its settings: it is computed once per stage and settings, in its own artifact
    directory (``<artifacts>/<stage id>-scan-<settings hash>/``, verified like any other), and every
    such cell reuses it. On the benign row that is the undefended cell and each defense that found
    nothing to change (CLP, NC): two to three scans of ten."""
    if not outcome.unchanged:
        reasr, details, tensors = reverse_engineer(outcome.model, test, info, scan_config)
        save_file(tensors, str(out_dir / "scan.safetensors"))
        return reasr, details
    shared = ws.root / f"{stage.id}-scan-{content_hash(scan_config)}"
    cached = finished(shared, progress.log)
    if cached is None:
        writer = ArtifactWriter(shared)
        try:
            reasr, details, tensors = reverse_engineer(outcome.model, test, info, scan_config)
            save_file(tensors, str(writer.tmp / "scan.safetensors"))
            cached = writer.commit({"reasr": reasr, "details": details})
        except BaseException:
            writer.discard()
            raise
    shutil.copyfile(shared / "scan.safetensors", out_dir / "scan.safetensors")
    return cached["reasr"], {**cached["details"], "shared": shared.name}


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
            result_metrics["der"] = accuracy.defense_effectiveness_rating(
                undefended["asr"], result_metrics["asr"], undefended["c_acc"], result_metrics["c_acc"])
        else:
            result_metrics["der"] = None
        if outcome.flagged is not None:
            from bench.metrics.detection import detection_metrics

            result_metrics.update(detection_metrics(outcome.flagged, poisoned.poisoned_indices, len(train)))
        extras_s = measure_extras(spec, ws, outcome, attack, test, triggered, result_metrics, writer)
        scan_s = None
        if spec.scan is not None:
            t0 = time.perf_counter()
            result_metrics["reasr"], outcome.details["scan"] = scan_cell_model(outcome, stage, ws, test, info, spec.scan,
                                                                               writer.tmp)
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
                              **({"scan_s": scan_s} if scan_s is not None else {}), **extras_s},
                  "peak_memory_mb": peak_memory_mb(ws.device), "environment": environment(ws.device),
                  "details": outcome.details, "wall": wall_span(started_at)}
        result = writer.commit(result)
    except BaseException:
        writer.discard()
        raise
    return result


def measure_extras(spec: CellSpec, ws: Workspace, outcome: DefenseResult, attack: Attack, test: ImageSet, triggered,
                   result_metrics: dict, writer: ArtifactWriter) -> dict[str, float]:
    """The cell's ``evaluation`` measurements (bench.spec.EvalConfig): selection quality when the
    defense declares the units it ablated, and penultimate features for the report's t-SNE.
    Returns their timings; metrics go into ``result_metrics``, details into ``outcome.details``."""
    if spec.evaluation is None:
        return {}
    config = build_config(EvalConfig, spec.evaluation, "eval.")
    timings: dict[str, float] = {}
    stage = spec.stage
    if config.oracle_samples > 0 and outcome.selection is not None and attack.has_trigger:
        from bench.metrics.selection import BATCH_SIZE, selection_quality

        t0 = time.perf_counter()
        undefended = ws.load_stage(stage)[0]  # a fresh copy: the defense may have changed its own in place
        x_trig, _, y_target = (t[:config.oracle_samples] for t in triggered)
        # the CPU is fastest at the oracle's own batch (measured there); a GPU wants the profile's larger one
        batch_size = max(BATCH_SIZE, stage.eval_batch_size) if ws.device.type == "cuda" else BATCH_SIZE
        quality = selection_quality(undefended, outcome.selection, x_trig, y_target, batch_size)
        result_metrics.update(quality.metrics())
        outcome.details["selection"] = quality.to_json()
        del undefended
        timings["oracle_s"] = round(time.perf_counter() - t0, 3)
    if config.feature_samples > 0 and hasattr(outcome.model, "features") and hasattr(outcome.model, "classifier"):
        t0 = time.perf_counter()
        save_file(penultimate_features(outcome.model, test, triggered if attack.has_trigger else None,
                                       config.feature_samples, stage.seed, stage.eval_batch_size),
                  str(writer.tmp / "features.safetensors"))
        timings["features_s"] = round(time.perf_counter() - t0, 3)
    return timings


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, test: ImageSet, triggered, samples: int, seed: int,
                         batch_size: int) -> dict[str, torch.Tensor]:
    """Penultimate features of ``samples`` clean test images and as many triggered ones (the same
    images for every cell of a stage), with their true labels, the attack's targets and the model's
    predictions: what the report's t-SNE draws, so that it never rebuilds a model."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randperm(len(test), generator=generator)[:samples].to(test.x.device)
    parts = {"clean": (test.x[clean], test.y[clean], torch.full((len(clean),), -1, dtype=torch.long, device=test.y.device))}
    if triggered is not None:
        x_trig, y_true, y_target = triggered
        chosen = torch.randperm(len(x_trig), generator=generator)[:samples].to(x_trig.device)
        parts["triggered"] = (x_trig[chosen], y_true[chosen], y_target[chosen])
    x = torch.cat([part[0] for part in parts.values()])
    features = engine.infer(model, x, lambda batch: model.features(batch).flatten(1).float(), batch_size)
    predicted = model.classifier(features).argmax(1)  # from the same pass: the head is one linear layer
    return {"features": features.cpu(), "labels": torch.cat([part[1] for part in parts.values()]).cpu().long(),
            "targets": torch.cat([part[2] for part in parts.values()]).cpu().long(),
            "predicted": predicted.cpu(),
            "triggered": torch.cat([torch.full((len(part[0]),), name == "triggered") for name, part in parts.items()])}
