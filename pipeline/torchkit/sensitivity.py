"""Per-layer INT8 sensitivity and the ``fallback: auto`` search, shared by the sensitivity, quantize and quantize_onnx stages.

Framework-free: a stage supplies the quantizable layers and a ``build`` function that quantizes its model
with some layers kept FP32 (or only one layer quantized) and predicts the scored eval rows; this module
scores the predictions against the FP32 input's, ranks the layers and runs the greedy fallback search.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from pipeline.errors import StageError
from pipeline.records.sensitivity import FallbackRecord, FallbackTrial, LayerRef, LayerSensitivity, TrialFigures
from pipeline.torchkit.model_io import Feeds, feed_rows
from pipeline.torchkit.tasks import BudgetMetric, Scoring

# (names of the layers kept FP32, the one layer quantized alone or None) -> predictions of the scored eval rows
Build = Callable[[frozenset[str], "str | None"], np.ndarray]


@dataclass(frozen=True)
class Layer:
    """A quantizable layer: its name, type, stable position (``Conv#3``) and, where known, its torch module path."""

    name: str
    op_type: str
    position: str
    module_path: str | None = None

    def ref(self) -> LayerRef:
        """The layer as recorded in reports."""
        return LayerRef(name=self.name, op_type=self.op_type, position=self.position, module_path=self.module_path)

    def matches(self, pattern: str) -> bool:
        """Whether an fnmatch pattern matches its name, its module path or its position."""
        return any(fnmatchcase(label, pattern) for label in (self.name, self.module_path, self.position) if label)


def numbered(entries: Iterable[tuple[str, str, str | None]]) -> list[Layer]:
    """Layers from (name, op type, module path) in topological order, each numbered among those of its type."""
    seen: Counter[str] = Counter()
    layers = []
    for name, op_type, module_path in entries:
        layers.append(Layer(name, op_type, f"{op_type}#{seen[op_type]}", module_path))
        seen[op_type] += 1
    return layers


def matching_layers(patterns: list[str], layers: list[Layer], stage: str, param: str, what: str) -> list[Layer]:
    """The layers any fnmatch pattern matches (by name, module path or position), in order.

    StageError for a pattern that matches none, naming the nearest candidate (``what``: "a node of the model").
    """
    for pattern in patterns:
        if not any(layer.matches(pattern) for layer in layers):
            labels = [label for layer in layers for label in (layer.name, layer.module_path, layer.position) if label]
            nearest = difflib.get_close_matches(pattern, labels, n=1)
            hint = f"did you mean '{nearest[0]}'?" if nearest else f"names look like {', '.join(repr(label) for label in labels[:4])}"
            raise StageError(f"{stage}: {param} names '{pattern}', which is not {what}; {hint}")
    return [layer for layer in layers if any(layer.matches(pattern) for pattern in patterns)]


@dataclass(frozen=True)
class Scorer:
    """The scored eval rows, their prepared targets and the FP32 input's predictions: what every trial is compared with."""

    scoring: Scoring
    feeds: Feeds
    targets: np.ndarray
    reference: np.ndarray

    @classmethod
    def of(cls, scoring: Scoring, inputs: Feeds, targets: np.ndarray, reference: np.ndarray, rows: int | None = None) -> "Scorer":
        """The first ``rows`` eval rows (all when None), given the FP32 input's predictions of the whole split."""
        chosen = slice(0, rows)
        return cls(scoring, feed_rows(inputs, chosen), scoring.task.prepare_targets(targets[chosen], reference[chosen]), reference[chosen])

    def metric(self) -> BudgetMetric:
        """The recipe's budget figure and its direction."""
        return self.scoring.metric(self.scoring.task.figures(self.reference, self.targets))

    def score(self, predictions: np.ndarray) -> TrialFigures:
        """A trial's figures against the FP32 input."""
        compared = self.scoring.compare(self.reference, predictions, self.targets)
        metric = self.scoring.metric(compared["figures"])
        drop = metric.drop(compared["value"] - compared["delta"], compared["value"])
        return TrialFigures(value=compared["value"], drop=drop, agreement=compared["agreement"], relative_error=compared["relative_error"])


def recovery_of(int8: TrialFigures, fp32_alone: TrialFigures) -> tuple[float, float]:
    """What keeping one layer FP32 wins: (metric drop recovered, relative error recovered)."""
    return int8.drop - fp32_alone.drop, int8.relative_error - fp32_alone.relative_error


def ranked_by_recovery(layers: list[Layer], build: Build, scorer: Scorer, int8: TrialFigures) -> list[Layer]:
    """The layers most sensitive first: by the drop recovered when each alone stays FP32, then by the error recovered."""
    recoveries = {layer.name: recovery_of(int8, scorer.score(build(frozenset({layer.name}), None))) for layer in layers}
    return sorted(layers, key=lambda layer: recoveries[layer.name], reverse=True)


def measure_layers(layers: list[Layer], build: Build, scorer: Scorer) -> tuple[TrialFigures, list[LayerSensitivity]]:
    """The all-INT8 figures and each layer quantized alone and left FP32 alone, most costly first."""
    int8 = scorer.score(build(frozenset(), None))
    rows = []
    for layer in layers:
        alone = scorer.score(build(frozenset(), layer.name))
        fp32 = scorer.score(build(frozenset({layer.name}), None))
        recovery, error_recovery = recovery_of(int8, fp32)
        rows.append(LayerSensitivity(**layer.ref().model_dump(), quantized_alone=alone, fp32_alone=fp32,
                                     recovery=recovery, error_recovery=error_recovery))
    rows.sort(key=lambda row: (row.recovery, row.quantized_alone.drop, row.error_recovery), reverse=True)
    return int8, rows


@dataclass(frozen=True)
class Budget:
    """What ``fallback: auto`` must reach and how many layers it may keep FP32 for it."""

    max_drop: float
    max_fallback_layers: int


def search_fallback(
    ranked: list[Layer], first: TrialFigures, trial: Callable[[frozenset[str]], tuple[Any, TrialFigures]],
    budget: Budget, metric: str, stage: str,
) -> tuple[Any, FallbackRecord]:
    """Keep the next most sensitive layer FP32 until the drop is within budget; the winning product and the record.

    ``first`` is the plain INT8 model's figures (already over budget); ``trial(names)`` quantizes with those
    layers FP32. StageError naming the best set reached when ``max_fallback_layers`` layers are not enough.
    """
    trials = [FallbackTrial(layers=[], figures=first)]
    for count in range(1, min(budget.max_fallback_layers, len(ranked)) + 1):
        kept = ranked[:count]
        product, figures = trial(frozenset(layer.name for layer in kept))
        trials.append(FallbackTrial(layers=[layer.name for layer in kept], figures=figures))
        if figures.drop <= budget.max_drop + 1e-12:
            record = FallbackRecord(max_drop=budget.max_drop, max_fallback_layers=budget.max_fallback_layers,
                                    layers=[layer.ref() for layer in kept], trials=trials, met_budget=True)
            return product, record
    best = min(trials, key=lambda tried: tried.figures.drop)
    raise StageError(
        f"{stage}: fallback: auto could not meet max_drop {budget.max_drop:g} keeping up to {budget.max_fallback_layers} of "
        f"{len(ranked)} layers FP32: the best reached is {metric} drop {best.figures.drop:.4g} with "
        f"[{', '.join(best.layers) or 'no layer'}] FP32; raise max_fallback_layers or max_drop, or calibrate on more calibration_batches"
    )


def within_budget(first: TrialFigures, budget: Budget) -> FallbackRecord:
    """The record of a plain INT8 model that already meets the budget: nothing kept FP32."""
    return FallbackRecord(max_drop=budget.max_drop, max_fallback_layers=budget.max_fallback_layers,
                          trials=[FallbackTrial(layers=[], figures=first)], met_budget=True)
