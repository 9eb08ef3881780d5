"""The two pipelines: train a stage's undefended model, and apply one defense to it (a cell).

Each is a pure function of its spec (bench/spec.py) and the cached stages. Running one writes
artifacts under ``<artifacts>/<id>/`` (bench/artifacts.py: atomically, with every file's sha256,
verified before reuse) and returns its outcome; only the runner writes the store. A cell then
runs every metric plugin its spec lists (bench/metric.py), from model predictions; a finished
cell that lacks a metric, or holds it under another key, gets only that metric measured, on its
stored model, and its artifact directory rewritten with the new values.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import torch
from rich.markup import escape
from safetensors.torch import load_file, load_model, save_file, save_model

from bench import engine, progress
from bench.artifacts import ArtifactWriter, CorruptArtifact, finished
from bench.attack import Attack, AttackContext
from bench.config import build_config
from bench.data.base import ImageSet
from bench.defense import Defense, DefenseContext
from bench.metric import MeasureContext
from bench.metrics.accuracy import evaluate
from bench.models.base import build_model
from bench.registry import DEFENSES, METRICS
from bench.spec import CellSpec, StageSpec
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


def curve_monitor(attack: Attack, test: ImageSet, triggered, spec: StageSpec):
    if spec.curve_samples <= 0:
        return None

    def monitor(epoch: int, model: torch.nn.Module) -> dict:
        # A trigger that trains with the model (triggered is None) is re-stamped on the curve subset.
        current = triggered if triggered is not None else attack.triggered_test_set(
            ImageSet(test.x[:spec.curve_samples], test.y[:spec.curve_samples]))
        return {f"test_{k}": v for k, v in evaluate(model, test.x, test.y, current if attack.has_trigger else None,
                                                     spec.eval_batch_size, limit=spec.curve_samples).items()}

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
        result_metrics = evaluate(model, test.x, test.y, triggered if attack.has_trigger else None, spec.eval_batch_size)
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


def run_defense_cell(spec: CellSpec, ws: Workspace) -> dict:
    """Apply a defense to the cached undefended model of the cell's stage and measure its metrics;
    a finished cell only gets the metrics it lacks."""
    directory = ws.root / spec.id
    cached = finished(directory, progress.log)
    if cached is not None:
        missing = missing_metrics(spec, cached)
        return remeasure(spec, ws, cached, missing) if missing else cached
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
        outcome.model.eval()
        measure_ctx = MeasureContext(
            spec=spec, model=outcome.model, unchanged=outcome.unchanged, attack=attack, info=info, test=test,
            triggered=triggered if attack.has_trigger else None, train=poisoned.train,
            poisoned_indices=poisoned.poisoned_indices, flagged=outcome.flagged, selection=outcome.selection,
            undefended_metrics=stage_result["metrics"], undefended_model=lambda: ws.load_stage(stage)[0],
            device=ws.device, out_dir=writer.tmp, shared=ws, log=ctx.log)
        values, measurements = measure(spec, measure_ctx, list(spec.metrics))
        if not outcome.unchanged:
            save_model(outcome.model, str(writer.tmp / "model.safetensors"))
        tensors = dict(outcome.tensors)
        if outcome.flagged is not None:
            tensors["flagged"] = outcome.flagged
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(writer.tmp / "defense.safetensors"))
        with open(writer.tmp / "history.json", "w") as handle:
            json.dump(outcome.history, handle, default=float)
        figures_error = draw_defense_figures(defense_cls, writer.tmp, outcome.details, poisoned.poisoned_indices)
        if figures_error:
            outcome.details["figures_error"] = figures_error
        undefended = stage_result["metrics"]
        result = {"id": spec.id, "stage_id": stage.id, "spec": spec.to_json(), "metrics": values,
                  "measurements": measurements, "undefended": {k: undefended.get(k) for k in ("c_acc", "asr", "ra")},
                  "timings": {"attack_s": stage_result["timings"].get("total_s"), "defense_s": defense_s,
                              **metric_timings(measurements)},
                  "peak_memory_mb": peak_memory_mb(ws.device), "environment": environment(ws.device),
                  "details": outcome.details, "unchanged": outcome.unchanged,
                  "selection": outcome.selection, "wall": wall_span(started_at)}
        result = writer.commit(result)
    except BaseException:
        writer.discard()
        raise
    return result


def measure(spec: CellSpec, ctx: MeasureContext, names: list[str]) -> tuple[dict, dict]:
    """Run the named metrics on one cell: (column values, {name: {"key", "seconds", "details"}})."""
    keys = spec.metric_keys()
    values: dict = {}
    measurements: dict = {}
    for name in names:
        metric_cls = METRICS.get(name)
        metric = metric_cls(build_config(metric_cls.Config, spec.metrics[name], f"metric.{name}."))
        t0 = time.perf_counter()
        measured = metric.measure(ctx)
        declared = {column.name for column in metric_cls.columns}
        unknown = sorted(set(measured.values) - declared)
        if unknown:
            raise ValueError(f"metric {name!r} returned values for undeclared columns {unknown}; "
                             f"its columns: {sorted(declared)}")
        values.update(measured.values)
        measurements[name] = {"key": keys[name], "seconds": round(time.perf_counter() - t0, 3),
                              "details": measured.details}
    return values, measurements


def metric_timings(measurements: dict) -> dict[str, float]:
    seconds = {f"{name}_s": entry["seconds"] for name, entry in measurements.items()}
    return {**seconds, "metrics_s": round(sum(seconds.values()), 3)}


def missing_metrics(spec: CellSpec, result: dict) -> list[str]:
    """The metrics of the spec that the finished result lacks, or holds under another key."""
    stored = result.get("measurements") or {}
    return [name for name, key in spec.metric_keys().items() if (stored.get(name) or {}).get("key") != key]


def remeasure(spec: CellSpec, ws: Workspace, cached: dict, names: list[str]) -> dict:
    """Measure ``names`` on a finished cell, from its stored model and outcome, and rewrite its
    artifact directory (the other files are copied unchanged) with the merged result."""
    stage = spec.stage
    directory = ws.root / spec.id
    progress.log(f"{spec.label()}: measuring {', '.join(names)} on the finished cell")
    stage_result, _, attack = ready_stage(stage, ws)
    info, _, train, test = ws.split(stage)
    poisoned = attack.poison(train)
    triggered = ws.triggered(stage, attack, test)
    if cached.get("unchanged"):
        model = ws.load_stage(stage)[0]
    else:
        model = build_model(stage.model, info).to(ws.device)
        load_model(model, str(directory / "model.safetensors"), device=str(ws.device))
    flagged = None
    if (directory / "defense.safetensors").is_file():
        flagged = load_file(str(directory / "defense.safetensors"), device=str(ws.device)).get("flagged")
    writer = ArtifactWriter(directory)
    try:
        for path in directory.iterdir():
            if path.is_file() and path.name != "result.json":
                shutil.copyfile(path, writer.tmp / path.name)
        ctx = MeasureContext(
            spec=spec, model=model.eval(), unchanged=bool(cached.get("unchanged")), attack=attack, info=info, test=test,
            triggered=triggered if attack.has_trigger else None, train=poisoned.train,
            poisoned_indices=poisoned.poisoned_indices, flagged=flagged, selection=cached.get("selection"),
            undefended_metrics=stage_result["metrics"], undefended_model=lambda: ws.load_stage(stage)[0],
            device=ws.device, out_dir=writer.tmp, shared=ws,
            log=lambda message: progress.log(escape(f"[{spec.defense}] {message}")))
        values, measurements = measure(spec, ctx, names)
        result = {key: value for key, value in cached.items() if key != "files"}
        # a re-measured metric's old values go, even those it no longer defines for this cell
        replaced = {column.name for name in names for column in METRICS.get(name).columns}
        result["metrics"] = {**{k: v for k, v in (cached.get("metrics") or {}).items() if k not in replaced}, **values}
        result["measurements"] = {**(cached.get("measurements") or {}), **measurements}
        defense_timings = {k: v for k, v in (cached.get("timings") or {}).items() if k in ("attack_s", "defense_s")}
        result["timings"] = {**defense_timings, **metric_timings(result["measurements"])}
        result["spec"] = spec.to_json()
        result = writer.commit(result)
    except BaseException:
        writer.discard()
        raise
    return result


def draw_defense_figures(defense_cls, directory, details: dict, poisoned_indices) -> str | None:
    """The defense's own report figures (``Defense.report_figures``), drawn into the cell's
    directory with the stage's ground truth, which only this step (never the defense's run) sees;
    the report copies them, so it never needs the defense's code. A figure bug costs the figure,
    not the cell: the error is returned, stored with the cell and shown by the report."""
    from bench.defense import Defense

    if getattr(defense_cls.report_figures, "__func__", None) is getattr(Defense.report_figures, "__func__", None):
        return None
    try:
        defense_cls.report_figures(directory, details, poisoned_indices.cpu())
    except Exception as exc:
        progress.log(f"[yellow]{defense_cls.registered_name} figures failed: {exc.__class__.__name__}: {exc}[/yellow]")
        return f"{exc.__class__.__name__}: {exc}"
    return None
