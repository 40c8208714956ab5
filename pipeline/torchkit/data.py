"""Data sources: built-in ``digits`` (scikit-learn, ships offline) and ``synthetic``, or a user factory.

Every source yields ``(inputs, labels)`` batches from a train loader (calibration, fine-tuning) and an
eval loader (validation). Splits and shuffling are seeded so results are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import DataError, RecipeError
from pipeline.imports import resolve_callable


@dataclass
class DataBundle:
    """Train and eval loaders of one data source."""

    train: Iterable[Any]
    eval: Iterable[Any]
    train_seed: int | None = None  # the shuffle seed of a built-in train loader (None: a user factory's own loader)

    def for_stage(self) -> "DataBundle":
        """This data with a train loader of its own whose shuffling starts again from the data seed.

        Stages share one bundle per run, but a shared shuffling generator would make what a stage
        trains or calibrates on depend on which stages read the train data before it (thread timing,
        cache hits); the artifact must depend only on its cache key. A user factory's loader is used as is.
        """
        if self.train_seed is None or not isinstance(self.train, DataLoader):
            return self
        train = DataLoader(
            self.train.dataset, batch_size=self.train.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.train_seed),
        )
        fresh = DataBundle(train=train, eval=self.eval, train_seed=self.train_seed)
        fresh.__dict__["eval_arrays"] = self.eval_arrays  # computed once per run, shared read-only
        return fresh

    @cached_property
    def eval_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole eval split as float32 inputs and int64 labels (validation compares every model on it)."""
        inputs, labels = [], []
        for batch in self.eval:
            batch_inputs, batch_labels = split_batch(batch, "eval")
            inputs.append(batch_inputs.float().numpy())
            labels.append(batch_labels.long().numpy())
        if not inputs:
            raise DataError("the eval loader yielded no batches; validation needs at least one")
        return np.concatenate(inputs), np.concatenate(labels)

    def example_batch(self) -> torch.Tensor:
        """A small real input batch (from eval) for tracing, export and parity checks."""
        return torch.from_numpy(self.eval_arrays[0][:8])


def check_input_shape(data: DataBundle, input_shape: list[int]) -> None:
    """Refuse data whose examples are not shaped like ``model.input_shape`` (batch dimension aside)."""
    example_shape = list(data.eval_arrays[0].shape[1:])
    if example_shape != list(input_shape[1:]):
        raise DataError(
            f"the data's examples have shape {example_shape} but model.input_shape {list(input_shape)} expects "
            f"{list(input_shape[1:])} per example; fix the data source or model.input_shape"
        )


def split_batch(batch: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack an ``(inputs, labels)`` batch, or say what the loader yields instead."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(f"the {split} loader must yield (inputs, labels) pairs; it yielded a {type(batch).__name__}")
    inputs, labels = batch[0], batch[1]
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError(f"the {split} loader must yield tensors; it yielded {type(inputs).__name__}, {type(labels).__name__}")
    return inputs, labels


def train_shuffle_seed(seed: int) -> int:
    """The seed of a built-in train loader's shuffling, derived from the data section's ``seed``."""
    return seed + 1


def _loaders(inputs: torch.Tensor, labels: torch.Tensor, eval_fraction: float, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    eval_count = max(1, int(round(len(labels) * eval_fraction)))
    eval_index, train_index = order[:eval_count], order[eval_count:]
    train = DataLoader(
        TensorDataset(inputs[train_index], labels[train_index]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(train_shuffle_seed(seed)),
    )
    evaluation = DataLoader(TensorDataset(inputs[eval_index], labels[eval_index]), batch_size=batch_size)
    return train, evaluation


def digits(batch_size: int = 64, seed: int = 0, size: int = 8, eval_fraction: float = 0.2) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 1797 handwritten 8x8 digits scaled to [0, 1], optionally upscaled to ``size`` x ``size``."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    inputs = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False)
    return _loaders(inputs, torch.tensor(targets, dtype=torch.long), eval_fraction, batch_size, seed)


def synthetic(
    input_shape: list[int],
    batch_size: int = 64,
    seed: int = 0,
    num_samples: int = 512,
    num_classes: int = 10,
    eval_fraction: float = 0.25,
) -> tuple[DataLoader, DataLoader]:
    """Gaussian clusters, one per class, shaped like the model's input: separable, reproducible, offline."""
    generator = torch.Generator().manual_seed(seed)
    example_shape = tuple(input_shape[1:])
    centroids = torch.randn((num_classes, *example_shape), generator=generator)
    labels = torch.arange(num_samples) % num_classes
    inputs = centroids[labels] + 0.5 * torch.randn((num_samples, *example_shape), generator=generator)
    return _loaders(inputs, labels, eval_fraction, batch_size, seed)


def build_data(spec: Any, input_shape: list[int]) -> DataBundle:
    """Build the loaders a recipe's ``data`` section describes."""
    kwargs = dict(spec.kwargs)
    if spec.factory is not None:
        factory = resolve_callable(spec.factory, "data.factory")
        try:
            made = factory(**kwargs)
        except Exception as error:
            raise DataError(f"data.factory '{spec.factory}' raised {type(error).__name__}: {error}") from error
        if isinstance(made, dict) and {"train", "eval"} <= set(made):
            made = (made["train"], made["eval"])
        if not isinstance(made, (tuple, list)) or len(made) != 2:
            raise DataError(f"data.factory '{spec.factory}' must return (train_loader, eval_loader) or {{'train': ..., 'eval': ...}}")
        return DataBundle(train=made[0], eval=made[1])
    try:
        if spec.source == "digits":
            train, evaluation = digits(batch_size=spec.batch_size, seed=spec.seed, **kwargs)
        else:
            train, evaluation = synthetic(input_shape, batch_size=spec.batch_size, seed=spec.seed, **kwargs)
    except TypeError as error:
        raise RecipeError(f"data.kwargs: {error} (source '{spec.source}')") from None
    return DataBundle(train=train, eval=evaluation, train_seed=train_shuffle_seed(spec.seed))
