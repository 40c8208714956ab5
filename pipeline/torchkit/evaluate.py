"""Accuracy and agreement of a model variant against the FP32 baseline, on the same eval inputs."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.progress import track
from pipeline.torchkit.model_io import Feeds, feed_rows, feeds_length
from pipeline.torchkit.runners import Runner

Rows = TypeVar("Rows", np.ndarray, torch.Tensor)


def rows_of(data: Rows, size: int) -> Rows:
    """``size`` rows taken from ``data`` in turn, repeating from the start when it has fewer (a new array/tensor)."""
    if isinstance(data, torch.Tensor):
        return data[torch.arange(size) % len(data)]
    return data[np.arange(size) % len(data)]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is the label."""
    return float((logits.argmax(axis=1) == labels).mean())


def agreement(a_logits: np.ndarray, b_logits: np.ndarray) -> float:
    """Fraction of rows on which both sets of logits predict the same class."""
    return float((a_logits.argmax(axis=1) == b_logits.argmax(axis=1)).mean())


def all_finite(logits: np.ndarray) -> bool:
    """True when no output is NaN or infinite."""
    return bool(np.isfinite(logits).all())


def logit_parity(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Agreement of predicted classes with ``reference`` and the largest |Δ logit| (in float64)."""
    max_abs_diff = float(np.max(np.abs(logits.astype(np.float64) - reference)))
    return agreement(logits, reference), max_abs_diff


def predict_all(runner: Runner, feeds: Feeds, batch_size: int = 256, description: str = "predict") -> np.ndarray:
    """Predictions for every row of the feeds, predicted in batches."""
    starts = range(0, feeds_length(feeds), batch_size)
    chunks = [runner.predict(feed_rows(feeds, slice(start, start + batch_size))) for start in track(starts, description)]
    return np.concatenate(chunks)


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy of each class (None for a class absent from the labels)."""
    accuracies: list[float | None] = []
    for label in range(num_classes):
        mask = labels == label
        accuracies.append(float((predictions[mask] == label).mean()) if mask.any() else None)
    return accuracies


def compare_logits(baseline_logits: np.ndarray, variant_logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Top-1, its change vs the baseline, prediction agreement, |Δ logit| and per-class accuracy deltas."""
    if baseline_logits.shape != variant_logits.shape:
        raise ValueError(f"variant logits {variant_logits.shape} do not match baseline {baseline_logits.shape}")
    num_classes = baseline_logits.shape[1]
    baseline_predictions = baseline_logits.argmax(axis=1)
    variant_predictions = variant_logits.argmax(axis=1)
    baseline_top1 = float((baseline_predictions == labels).mean())
    variant_top1 = float((variant_predictions == labels).mean())
    difference = np.abs(variant_logits.astype(np.float64) - baseline_logits.astype(np.float64))
    baseline_classes = per_class_accuracy(baseline_predictions, labels, num_classes)
    variant_classes = per_class_accuracy(variant_predictions, labels, num_classes)
    return {
        "top1": variant_top1,
        "delta_top1": variant_top1 - baseline_top1,
        "agreement": float((variant_predictions == baseline_predictions).mean()),
        "max_abs_logit_diff": float(difference.max()),
        "mean_abs_logit_diff": float(difference.mean()),
        "per_class_top1": variant_classes,
        "per_class_delta": [
            None if base is None or variant is None else variant - base
            for base, variant in zip(baseline_classes, variant_classes)
        ],
        "samples": int(len(labels)),
    }
