"""Data sources: built-in ``digits`` (scikit-learn, ships offline) and ``synthetic``, or a user factory.

Every source yields ``(inputs, target)`` batches from a train loader (calibration, fine-tuning) and an
eval loader (validation); inputs may be a tensor, a tuple or a dict of tensors, as ``model.inputs``
declares (``pipeline.torchkit.model_io``). Splits and shuffling are seeded so results are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import DataError, RecipeError
from pipeline.imports import resolve_callable
from pipeline.torchkit.model_io import Feeds, ModelIO, feed_rows


@dataclass(frozen=True)
class EvalSet:
    """The whole eval split: feeds (input name -> array) and the targets as the loader gave them."""

    inputs: Feeds
    targets: np.ndarray

    def example(self, rows: int = 8) -> Feeds:
        """The first ``rows`` eval rows: a small real batch for tracing, export and parity checks."""
        return feed_rows(self.inputs, slice(0, rows))


@dataclass
class DataBundle:
    """Train and eval loaders of one data source, read through the model's declared inputs."""

    train: Iterable[Any]
    eval: Iterable[Any]
    io: ModelIO
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
        fresh = DataBundle(train=train, eval=self.eval, io=self.io, train_seed=self.train_seed)
        fresh.__dict__["eval_set"] = self.eval_set  # computed once per run, shared read-only
        return fresh

    @cached_property
    def eval_set(self) -> EvalSet:
        """The whole eval split as feeds in the declared dtypes and targets (validation compares every model on it)."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.io.names}
        targets = []
        for batch in self.eval:
            tensors, batch_targets = self.io.split_batch(batch, "eval")
            for name, array in self.io.to_feeds(tensors).items():
                parts[name].append(array)
            targets.append(batch_targets.detach().cpu().numpy())
        if not targets:
            raise DataError("the eval loader yielded no batches; validation needs at least one")
        return EvalSet(inputs={name: joined(arrays, f"eval input {name}") for name, arrays in parts.items()},
                       targets=joined(targets, "eval targets"))

    def train_batches(self, split: str = "train") -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The train loader's batches as (input name -> tensor, target)."""
        for batch in self.train:
            yield self.io.split_batch(batch, split)


def joined(arrays: list[np.ndarray], what: str) -> np.ndarray:
    """Batches joined along the batch axis; DataError when their other dims differ (batches padded to different lengths)."""
    shapes = {array.shape[1:] for array in arrays}
    if len(shapes) > 1:
        listed = ", ".join(str(list(shape)) for shape in sorted(shapes)[:3])
        raise DataError(
            f"{what}: the eval batches differ in shape beyond the batch ({listed}); pad every eval batch to one length "
            "(e.g. a tokenizer's padding='max_length') so all models are compared on the same inputs"
        )
    return np.concatenate(arrays)


def check_inputs(data: DataBundle) -> None:
    """Refuse eval data whose inputs do not have the declared ranks, fixed dims and shared dims."""
    data.io.check_feeds(data.eval_set.inputs, "the data")


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


def build_data(spec: Any, io: ModelIO) -> DataBundle:
    """Build the loaders a recipe's ``data`` section describes, read through the model's declared inputs."""
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
        return DataBundle(train=made[0], eval=made[1], io=io)
    if spec.source == "synthetic" and (len(io.specs) != 1 or io.specs[0].dtype != "float32"):
        raise RecipeError("data.source synthetic makes one float32 input (model.input_shape); for model.inputs give a data.factory")
    try:
        if spec.source == "digits":
            train, evaluation = digits(batch_size=spec.batch_size, seed=spec.seed, **kwargs)
        else:
            shape = [1] + [dim if isinstance(dim, int) else 8 for dim in io.specs[0].shape[1:]]
            train, evaluation = synthetic(shape, batch_size=spec.batch_size, seed=spec.seed, **kwargs)
    except TypeError as error:
        raise RecipeError(f"data.kwargs: {error} (source '{spec.source}')") from None
    return DataBundle(train=train, eval=evaluation, io=io, train_seed=train_shuffle_seed(spec.seed))
