"""A plain supervised training loop, shared by the demo baseline and stages that fine-tune."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.progress import note, track
from pipeline.run.cancel import raise_if_cancelled
from pipeline.torchkit.data import split_batch


def cross_entropy_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default training loss: cross-entropy of the model's logits against the labels."""
    return nn.functional.cross_entropy(model(inputs), labels)


def train_classifier(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    description: str = "train",
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.optim.Optimizer, float]:
    """Train ``model`` (Adam unless an optimizer is given); returns the optimizer and last epoch's mean loss.

    ``loss(model, inputs, labels)`` computes one batch's loss (default: cross-entropy of ``model(inputs)``).
    A cancelled run (Ctrl-C) stops it before the next batch with ``Cancelled``.
    """
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loss_of_batch = loss or cross_entropy_loss
    model.train()
    mean_loss = float("nan")
    for epoch in track(range(epochs), description):
        total, batches = 0.0, 0
        for batch in train_loader:
            raise_if_cancelled()
            inputs, labels = split_batch(batch, "train")
            optimizer.zero_grad(set_to_none=True)
            batch_loss = loss_of_batch(model, inputs, labels)
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item()
            batches += 1
        mean_loss = total / max(batches, 1)
        note(f"loss {mean_loss:.4f}")  # shown beside the epoch bar of a run's live view
    model.eval()
    return optimizer, mean_loss
