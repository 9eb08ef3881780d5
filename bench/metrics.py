"""The protocol's metrics, computed from model predictions. Percentages with two decimals."""
from __future__ import annotations

import torch


def _percent(fraction: float) -> float:
    return round(100.0 * fraction, 2)


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """C-ACC: share of clean test samples predicted as their label."""
    return _percent((predictions == labels).float().mean().item())


def attack_success_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """ASR over the triggered samples given (the caller drops target-class samples for all-to-one)."""
    return _percent((predictions == targets).float().mean().item())


def robust_accuracy(predictions: torch.Tensor, true_labels: torch.Tensor) -> float:
    """RA: triggered samples still predicted as their true label."""
    return _percent((predictions == true_labels).float().mean().item())


def defense_effectiveness_rating(asr_undefended: float, asr_defended: float,
                                 acc_undefended: float, acc_defended: float) -> float:
    """DER in [0, 1] from percentages: rewards the ASR drop, penalises the accuracy drop."""
    asr_drop = max(0.0, asr_undefended - asr_defended) / 100.0
    acc_drop = max(0.0, acc_undefended - acc_defended) / 100.0
    return round((asr_drop - acc_drop + 1.0) / 2.0, 4)


def detection_metrics(flagged: torch.Tensor, poisoned: torch.Tensor, num_samples: int) -> dict[str, float]:
    """Precision, recall (TPR) and FPR of a flagged set of training indices, in percent."""
    truth = torch.zeros(num_samples, dtype=torch.int64)
    truth[poisoned.cpu().long()] = 1
    guess = torch.zeros(num_samples, dtype=torch.int64)
    guess[flagged.cpu().long()] = 1
    from sklearn.metrics import confusion_matrix

    (tn, fp), (fn, tp) = confusion_matrix(truth.numpy(), guess.numpy(), labels=[0, 1])
    return {
        "det_precision": _percent(tp / (tp + fp)) if tp + fp else 0.0,
        "det_recall": _percent(tp / (tp + fn)) if tp + fn else 0.0,
        "det_fpr": _percent(fp / (fp + tn)) if fp + tn else 0.0,
        "det_flagged": int(tp + fp),
    }
