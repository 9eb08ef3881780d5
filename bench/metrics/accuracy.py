"""C-ACC, ASR, RA and DER (docs/protocol.md, "Metrics"), computed from model predictions.
Percentages with two decimals. ``evaluate`` is the one evaluation the attack stage, the training
curves and every cell use."""
from __future__ import annotations

import torch

from bench import engine
from bench.metric import Column, Heatmap, MeasureContext, Measurement, Metric
from bench.registry import register_metric


def percent(fraction: float) -> float:
    return round(100.0 * fraction, 2)


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """C-ACC: share of clean test samples predicted as their label."""
    return percent((predictions == labels).float().mean().item())


def attack_success_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """ASR over the triggered samples given (the caller drops target-class samples for all-to-one)."""
    return percent((predictions == targets).float().mean().item())


def robust_accuracy(predictions: torch.Tensor, true_labels: torch.Tensor) -> float:
    """RA: triggered samples still predicted as their true label."""
    return percent((predictions == true_labels).float().mean().item())


def defense_effectiveness_rating(asr_undefended: float, asr_defended: float,
                                 acc_undefended: float, acc_defended: float) -> float:
    """DER in [0, 1] from percentages: rewards the ASR drop, penalises the accuracy drop."""
    asr_drop = max(0.0, asr_undefended - asr_defended) / 100.0
    acc_drop = max(0.0, acc_undefended - acc_defended) / 100.0
    return round((asr_drop - acc_drop + 1.0) / 2.0, 4)


def evaluate(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, triggered, batch_size: int,
             limit: int | None = None) -> dict[str, float | None]:
    """C-ACC on the clean test images; ASR and RA on the triggered ones ((images, true labels,
    targets), or None for an attack without a trigger); ``limit``: only the first images of each."""
    x_clean, y_clean = (test_x, test_y) if limit is None else (test_x[:limit], test_y[:limit])
    result: dict[str, float | None] = {"c_acc": clean_accuracy(engine.predict(model, x_clean, batch_size), y_clean)}
    if triggered is not None:
        x_trig, y_true, y_target = triggered if limit is None else (t[:limit] for t in triggered)
        predictions = engine.predict(model, x_trig, batch_size)
        result["asr"] = attack_success_rate(predictions, y_target)
        result["ra"] = robust_accuracy(predictions, y_true)
    else:
        result["asr"] = result["ra"] = None
    return result


@register_metric("accuracy")
class Accuracy(Metric):
    """The protocol's metrics on the whole test set: C-ACC, ASR, RA, and DER against the cell's own
    undefended model."""

    title = "Results"
    description = ("C-ACC, ASR and RA in %, DER in [0, 1] (0.5: no change; higher is better); `benign` has no "
                   "trigger, so no ASR, RA or DER.")
    columns = (
        Column("c_acc", "C-ACC", "higher", description="accuracy on the clean test set",
               heatmap=Heatmap("RdYlGn", None, 100.0, needs_trigger=False)),
        Column("asr", "ASR", "lower", description="triggered test samples sent to the target",
               heatmap=Heatmap("Reds", 0.0, 100.0)),
        Column("ra", "RA", "higher", description="triggered test samples still given their true label"),
        Column("der", "DER", "higher", unit="", description="defense effectiveness rating in [0, 1]; 0.5: no change",
               heatmap=Heatmap("RdYlGn", 0.0, 1.0, center=0.5, digits=4)),
    )

    def measure(self, ctx: MeasureContext) -> Measurement:
        values: dict = evaluate(ctx.model, ctx.test.x, ctx.test.y, ctx.triggered, ctx.batch_size)
        undefended = ctx.undefended_metrics
        values["der"] = None if ctx.triggered is None else defense_effectiveness_rating(
            undefended["asr"], values["asr"], undefended["c_acc"], values["c_acc"])
        return Measurement(values)
