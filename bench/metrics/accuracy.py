"""C-ACC, ASR, RA and DER (docs/protocol.md, "Metrics"), computed from model predictions. Percentages with two decimals."""
from __future__ import annotations

import torch


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
