"""A plain supervised training loop, shared by the demo baseline and stages that fine-tune."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.progress import note, track
from pipeline.run.cancel import raise_if_cancelled
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.tasks import Classification, Task

# loss(model, inputs by name, targets) -> the batch's loss
LossOfBatch = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def task_loss(io: ModelIO, task: Task) -> LossOfBatch:
    """The default training loss: the task's loss (cross-entropy for classes) of the model's prediction."""

    def loss(model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return task.loss(io.predict(model, inputs), targets)

    return loss


def train_model(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    description: str = "train",
    loss: LossOfBatch | None = None,
    io: ModelIO | None = None,
    task: Task | None = None,
) -> tuple[torch.optim.Optimizer, float]:
    """Train ``model`` (Adam unless an optimizer is given); returns the optimizer and last epoch's mean loss.

    Batches are read through ``io`` (default: one input). ``loss(model, inputs, targets)`` computes one
    batch's loss (default: ``task``'s loss of the prediction, cross-entropy when no task is given). A
    cancelled run (Ctrl-C) stops it before the next batch with ``Cancelled``.
    """
    io = io or ModelIO.single()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loss_of_batch = loss or task_loss(io, task or Classification())
    model.train()
    mean_loss = float("nan")
    for epoch in track(range(epochs), description):
        total, batches = 0.0, 0
        for batch in train_loader:
            raise_if_cancelled()
            inputs, targets = io.split_batch(batch, "train")
            optimizer.zero_grad(set_to_none=True)
            batch_loss = loss_of_batch(model, inputs, targets)
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item()
            batches += 1
        mean_loss = total / max(batches, 1)
        note(f"loss {mean_loss:.4f}")  # shown beside the epoch bar of a run's live view
    model.eval()
    return optimizer, mean_loss
