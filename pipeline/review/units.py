"""How figures read in tables and pages: sizes in human units, a metric by its name and kind (fractions as %)."""

from __future__ import annotations

from pipeline.recipe.schema import FRACTION_FIGURES


def format_bytes(size: int | None) -> str:
    """Human-readable size: 1.2 MB, 340.0 kB."""
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


METRIC_LABELS = {
    "top1": "top-1", "top5": "top-5", "mse": "MSE", "mae": "MAE", "max_abs_error": "max |error|", "r2": "R²",
    "f1_micro": "F1 micro", "f1_macro": "F1 macro", "mean_average_precision": "mAP", "exact_match": "exact match",
    "token_accuracy": "token accuracy", "agreement": "agreement",
}


def metric_label(metric: str) -> str:
    """A figure's name as a reader knows it: top-1, MSE, F1 micro; a metric function's figure keeps its own name."""
    return METRIC_LABELS.get(metric, metric)


def metric_title(metric: str) -> str:
    """A figure's name opening a title: Top-1, MSE, F1 micro."""
    label = metric_label(metric)
    return label[:1].upper() + label[1:]


def is_fraction(metric: str) -> bool:
    """Whether the figure is a fraction of 1, shown as a percentage and its changes as points."""
    return metric in FRACTION_FIGURES


def format_figure(metric: str, value: float | None) -> str:
    """A figure's value: 97.20% for fractions, 0.0391 for others, '-' when unknown."""
    if value is None:
        return "-"
    return f"{value:.2%}" if is_fraction(metric) else f"{value:.4g}"


def format_delta(metric: str, delta: float | None) -> str:
    """A figure's signed change: -0.40 pt for fractions, +0.0012 for others (0 for none), '-' when unknown."""
    if delta is None:
        return "-"
    if is_fraction(metric):
        return f"{delta * 100:+.2f} pt"
    return "0" if delta == 0 else f"{delta:+.4g}"


def format_amount(metric: str, amount: float) -> str:
    """An unsigned amount of a figure as a regression message states it: points for fractions ('0.40'), else '0.0123'."""
    return f"{amount * 100:.2f}" if is_fraction(metric) else f"{amount:.4f}"


def plot_scale(metric: str) -> float:
    """What a figure is multiplied by on a plot axis: 100 for fractions (shown in %), else 1."""
    return 100.0 if is_fraction(metric) else 1.0
