"""Predictions of a model over a whole set of feeds, in batches, with progress."""

from __future__ import annotations

import numpy as np

from pipeline.progress import track
from pipeline.torchkit.model_io import Feeds, feed_rows, feeds_length
from pipeline.torchkit.runners import Runner


def all_finite(outputs: np.ndarray) -> bool:
    """True when no output is NaN or infinite."""
    return bool(np.isfinite(outputs).all())


def predict_all(runner: Runner, feeds: Feeds, batch_size: int = 256, description: str = "predict") -> np.ndarray:
    """Predictions for every row of the feeds, predicted in batches."""
    starts = range(0, feeds_length(feeds), batch_size)
    chunks = [runner.predict(feed_rows(feeds, slice(start, start + batch_size))) for start in track(starts, description)]
    return np.concatenate(chunks)
