"""The few figures of each stage a reviewer looks for, read from its metrics in the run record.

Validate and benchmark figures are not here: they are read through ``pipeline.records.variants`` and
shown in the variants and timings tables. A stage that measured the recipe's metric (``metric``, ``value``,
``delta`` in its metrics) shows it by name (top-1, MSE, ...); a figure a stage did not record is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.review.units import format_bytes, format_delta, format_figure, metric_label


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _layers(value: dict[str, int]) -> str:
    return ", ".join(f"{count}× {layer}" for layer, count in value.items()) or "none"


def _removed(before: str, after: str, render: Callable[[Any], str] = _count) -> Callable[[dict[str, Any]], str | None]:
    """A figure 'N of M (x%)' removed, from a before/after pair of counts."""
    def shown(metrics: dict[str, Any]) -> str | None:
        old, new = metrics.get(before), metrics.get(after)
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or not old:
            return None
        return f"{render(old - new)} of {render(old)} ({(old - new) / old:.1%})"
    return shown


def _field(name: str, render: Callable[[Any], str] = str) -> Callable[[dict[str, Any]], str | None]:
    """A figure read from one metrics field, rendered when the field is present."""
    def shown(metrics: dict[str, Any]) -> str | None:
        value = metrics.get(name)
        return None if value is None else render(value)
    return shown


def _metric_field(name: str, legacy: str) -> Callable[[dict[str, Any]], str | None]:
    """A value of the stage's metric (``metrics['metric']``) read from ``name``, or from the top-1 field ``legacy`` that
    stages wrote before metrics were named."""
    def shown(metrics: dict[str, Any]) -> str | None:
        metric, value = metrics.get("metric") or "top1", metrics.get(name)
        if not isinstance(value, (int, float)):
            metric, value = "top1", metrics.get(legacy)
        return format_figure(metric, value) if isinstance(value, (int, float)) else None
    return shown


def _metric_change(metrics: dict[str, Any]) -> tuple[str, str] | None:
    """(the metric's name, its value and change vs FP32) of a stage that measured the recipe's metric, else None."""
    metric, value, delta = metrics.get("metric"), metrics.get("value"), metrics.get("delta")
    if not isinstance(metric, str) or not isinstance(value, (int, float)):
        return None
    change = f" ({format_delta(metric, delta)} vs FP32)" if isinstance(delta, (int, float)) else ""
    return metric_label(metric), format_figure(metric, value) + change


def _fallback_layers(metrics: dict[str, Any]) -> str | None:
    """The layers ``fallback: auto`` kept in FP32, by module path (else name), when it ran."""
    fallback = metrics.get("fallback")
    if not isinstance(fallback, dict) or not fallback.get("layers"):
        return None
    return ", ".join(str(layer.get("module_path") or layer.get("name")) for layer in fallback["layers"])


# stage implementation -> (label, how to read it from the stage's metrics), in display order; "{metric}" in a
# label is the name of the stage's metric (top-1 when the stage did not name one)
HIGHLIGHTS: dict[str, list[tuple[str, Callable[[dict[str, Any]], str | None]]]] = {
    "load_checkpoint": [("format", _field("format")), ("parameters", _field("parameters", _count)),
                        ("optimizer state", _field("has_optimizer_state", lambda v: "yes" if v else "no"))],
    "strip_optimizer": [("size removed", _removed("bytes_before", "bytes_after", format_bytes))],
    "fuse_conv_bn": [("fused pairs", _field("fused_pairs", _count)), ("method", _field("method")),
                     ("BatchNorms left", _field("batchnorms_left", _count))],
    "prune": [("MACs removed", _removed("macs_before", "macs_after")), ("sparsity", _field("sparsity", _percent)),
              ("method", _field("method")), ("parameters removed", _removed("params_before", "params_after"))],
    "distill": [("teacher {metric}", _metric_field("teacher_value", "teacher_top1")),
                ("student {metric} before", _metric_field("student_value_before", "student_top1_before")),
                ("student {metric}", _metric_field("student_value", "student_top1")), ("retention", _field("retention", _percent)),
                ("epochs", _field("epochs", _count))],
    "quantize": [("mode", _field("mode")), ("calibration batches", _field("calibration_batches", _count)),
                 ("quantized layers", _field("quantized_layers", _layers)), ("kept FP32 by fallback", _fallback_layers)],
    "quantize_onnx": [("mode", _field("mode")), ("calibration", _field("calibrate_method")),
                      ("calibration samples", _field("calibration_samples", _count)), ("format", _field("format")),
                      ("types", lambda m: f"weights {m['weight_type']}, activations {m['activation_type']}"
                       if m.get("weight_type") and m.get("activation_type") else None), ("kept FP32 by fallback", _fallback_layers)],
    "export_onnx": [("opset", _field("opset")), ("nodes", _field("nodes", _count)), ("file", _field("onnx_bytes", format_bytes))],
    "tensorrt": [("precision", _field("precision")), ("GPU", _field("gpu")), ("build", _field("build_seconds", lambda v: f"{v:.1f} s"))],
    "precision": [("dtype", _field("dtype")), ("GPU", _field("gpu"))],
    "select": [("chosen", _field("chosen")), ("target", _field("target")), ("objective", _field("objective"))],
    "sensitivity": [("layers measured", lambda m: str(len(m["layers"])) if isinstance(m.get("layers"), list) else None)],
}


def stage_highlights(stage: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of the figures worth showing for one stage, then its metric and change vs FP32 when it measured
    them; empty for a stage that recorded none of them."""
    metrics = stage.get("metrics") or {}
    named = metric_label(metrics.get("metric") or "top1")
    found = []
    for label, read in HIGHLIGHTS.get(stage.get("uses", ""), []):
        try:
            value = read(metrics)
        except (KeyError, TypeError, ValueError):
            value = None
        if value is not None:
            found.append((label.format(metric=named), value))
    change = _metric_change(metrics)
    return found + ([change] if change else [])
