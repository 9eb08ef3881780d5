"""Detection quality of a defense that flags training samples, against the stage's ground truth
(which the defense never sees). Percentages with two decimals."""
from __future__ import annotations

import torch

from bench.metric import Column, MeasureContext, Measurement, Metric
from bench.metrics.accuracy import percent
from bench.registry import register_metric


def detection_metrics(flagged: torch.Tensor, poisoned: torch.Tensor, num_samples: int) -> dict[str, float]:
    """Precision, recall (TPR) and FPR of a flagged set of training indices, in percent."""
    truth = torch.zeros(num_samples, dtype=torch.int64)
    truth[poisoned.cpu().long()] = 1
    guess = torch.zeros(num_samples, dtype=torch.int64)
    guess[flagged.cpu().long()] = 1
    from sklearn.metrics import confusion_matrix

    (tn, fp), (fn, tp) = confusion_matrix(truth.numpy(), guess.numpy(), labels=[0, 1])
    return {
        "det_precision": percent(tp / (tp + fp)) if tp + fp else 0.0,
        "det_recall": percent(tp / (tp + fn)) if tp + fn else 0.0,
        "det_fpr": percent(fp / (fp + tn)) if fp + tn else 0.0,
        "det_flagged": int(tp + fp),
    }


@register_metric("detection")
class Detection(Metric):
    """Precision, recall and FPR of the training samples a defense flags, against the true poisoned indices.

    Measured on the cells whose defense flags training samples (``DefenseResult.flagged``)."""

    title = "Detection of poisoned training samples"
    description = "Defenses that flag training samples, against the true poisoned indices (which they never see)."
    columns = (
        Column("det_precision", "precision", "higher", description="flagged samples that are poisoned"),
        Column("det_recall", "recall", "higher", description="poisoned samples flagged"),
        Column("det_fpr", "FPR", "lower", description="clean samples flagged"),
        Column("det_flagged", "flagged", "neither", unit="", description="samples flagged"),
    )

    def measure(self, ctx: MeasureContext) -> Measurement:
        if ctx.flagged is None:
            return Measurement()
        return Measurement(detection_metrics(ctx.flagged, ctx.poisoned_indices, len(ctx.train)))
