"""The demo baseline: ``digits_cnn`` trained on scikit-learn's digits, saved in the common training format."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.torchkit.data import digits
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn


def train_demo_checkpoint(checkpoint_path: Path, epochs: int = 15, seed: int = 0) -> dict[str, float]:
    """Train the baseline with a fixed seed and split, and save ``{model_state_dict, optimizer_state_dict, epoch, loss}``."""
    torch.manual_seed(seed)
    train_loader, eval_loader = digits(batch_size=64, seed=seed)
    model = digits_cnn()
    optimizer, loss = train_model(model, train_loader, epochs=epochs, lr=3e-3, description="train digits_cnn")
    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in eval_loader:
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": epochs, "loss": loss},
        checkpoint_path,
    )
    return {"loss": loss, "eval_top1": correct / total}
