"""Models of other shapes than one float tensor in and logits out, with offline data and trained checkpoints.

``optipipe example NAME`` trains one and saves its checkpoint; ``recipes/<name>.yaml`` optimizes it:

- ``bert``: a 4-layer Hugging Face ``BertForSequenceClassification`` (built from a ``BertConfig``, random
  init, no downloads) trained on a keyword task, saved with ``save_pretrained``; inputs ``input_ids`` and
  ``attention_mask`` [batch, seq], a ``SequenceClassifierOutput`` out; the data yields HF-style dict batches.
- ``lstm``: an LSTM text classifier over int64 token ids, the same task, ``(ids, label)`` batches.
- ``regression``: the tutorial ``Linear(10, 5) -> ReLU -> Linear(5, 1)`` on a smooth function, float targets.
- ``image-meta``: ``forward(image, meta) -> (logits, features)`` on digits plus a metadata vector,
  ``(image, meta, label)`` batches.
- ``dataparallel``: the digits CNN saved as pytorch-cifar does, ``{'net': DataParallel(model).state_dict(), 'acc', 'epoch'}``.

The keyword task: a sequence of token ids (0 pads, 1 starts) of noise tokens with two keywords of one class
at random places; the class is the label. Bag-of-words models and transformers learn it in a few epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PAD, START = 0, 1
KEYWORDS_PER_CLASS = 8


def keyword_sequences(count: int, seq_len: int, vocab_size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` padded sequences (ids, attention mask, label) of the keyword task."""
    first_noise = 2 + KEYWORDS_PER_CLASS * num_classes
    if vocab_size <= first_noise:
        raise ValueError(f"vocab_size must exceed {first_noise} for {num_classes} classes")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    lengths = torch.randint(seq_len // 2, seq_len + 1, (count,), generator=generator)
    ids = torch.randint(first_noise, vocab_size, (count, seq_len), generator=generator)
    ids[:, 0] = START
    for row in range(count):
        places = torch.randperm(int(lengths[row]) - 1, generator=generator)[:2] + 1
        keywords = 2 + KEYWORDS_PER_CLASS * labels[row] + torch.randint(0, KEYWORDS_PER_CLASS, (2,), generator=generator)
        ids[row, places] = keywords
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = PAD
    return ids, mask, labels


def keyword_task(
    batch_size: int = 32, seq_len: int = 16, vocab_size: int = 64, num_classes: int = 3, samples: int = 960,
    eval_fraction: float = 0.25, seed: int = 0, batches: str = "dict",
) -> tuple[DataLoader, DataLoader]:
    """Train and eval loaders of the keyword task.

    ``batches``: ``dict`` yields ``{'input_ids', 'attention_mask', 'labels'}`` (as Hugging Face collators do),
    ``ids`` yields ``(input_ids, label)`` pairs.
    """
    ids, mask, labels = keyword_sequences(samples, seq_len, vocab_size, num_classes, seed)
    split = int(samples * (1 - eval_fraction))
    if batches == "ids":
        parts = [TensorDataset(ids[:split], labels[:split]), TensorDataset(ids[split:], labels[split:])]
    elif batches == "dict":
        rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(samples)]
        parts = [rows[:split], rows[split:]]
    else:
        raise ValueError(f"batches must be 'dict' or 'ids', not {batches!r}")
    return DataLoader(parts[0], batch_size=batch_size), DataLoader(parts[1], batch_size=batch_size)


def tiny_bert(vocab_size: int = 64, hidden: int = 32, layers: int = 4, heads: int = 2, intermediate: int = 64,
              max_positions: int = 32, num_labels: int = 3) -> nn.Module:
    """A small ``BertForSequenceClassification`` from a ``BertConfig``: random init, nothing downloaded."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def regression_task(batch_size: int = 64, samples: int = 1024, features: int = 10, eval_fraction: float = 0.25,
                    seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """A smooth target of 10 features, ``y = x·w + 0.5·x0·x1 + noise``, with targets shaped [N] (float)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    weights = torch.randn(features, generator=generator)
    targets = inputs @ weights + 0.5 * inputs[:, 0] * inputs[:, 1] + 0.05 * torch.randn(samples, generator=generator)
    split = int(samples * (1 - eval_fraction))
    return (DataLoader(TensorDataset(inputs[:split], targets[:split]), batch_size=batch_size),
            DataLoader(TensorDataset(inputs[split:], targets[split:]), batch_size=batch_size))


def image_meta_task(batch_size: int = 64, meta_features: int = 4, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """scikit-learn digits with a metadata vector per image, as ``(image, meta, label)`` batches."""
    from pipeline.torchkit.data import digits

    loaders = []
    generator = torch.Generator().manual_seed(seed)
    for loader in digits(batch_size=batch_size, seed=seed):
        images, labels = loader.dataset.tensors
        meta = torch.randn(len(labels), meta_features, generator=generator)
        loaders.append(DataLoader(TensorDataset(images, meta, labels), batch_size=batch_size))
    return loaders[0], loaders[1]


def train(model: nn.Module, loaders: tuple[DataLoader, DataLoader], io: Any, task: str, epochs: int, lr: float) -> nn.Module:
    """Train ``model`` on the train loader with the task's loss; seeded by the caller."""
    from pipeline.torchkit.tasks import TASKS
    from pipeline.torchkit.train import train_model

    train_model(model, loaders[0], epochs=epochs, lr=lr, io=io, task=TASKS[task](task), description=f"train {type(model).__name__}")
    return model.eval()


def io_of(inputs: list[dict[str, Any]] | None = None, prediction: str | int | None = None) -> Any:
    """A ModelIO for training an example (the recipes declare the same)."""
    from pipeline.recipe.schema import InputSpec, OutputSpec
    from pipeline.torchkit.model_io import ModelIO

    if inputs is None:
        return ModelIO.single()
    return ModelIO([InputSpec(**spec) for spec in inputs], OutputSpec(prediction=prediction))


TOKENS = [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": 64},
          {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]}]


def write_bert(out: Path) -> Path:
    """The keyword-task BERT, saved with ``save_pretrained`` in ``out/bert``."""
    folder = out / "bert"
    model = train(tiny_bert(), keyword_task(), io_of(TOKENS), "classification", epochs=6, lr=2e-3)
    model.save_pretrained(folder)
    return folder


def write_lstm(out: Path) -> Path:
    """The keyword-task LSTM classifier's state_dict, ``out/lstm.pt``."""
    from pipeline.zoo import lstm_classifier

    tokens = [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": 64}]
    model = train(lstm_classifier(), keyword_task(batches="ids"), io_of(tokens), "classification", epochs=8, lr=5e-3)
    return save_state_dict(model.state_dict(), out / "lstm.pt")


def write_regression(out: Path) -> Path:
    """The regression MLP's state_dict, ``out/regression.pt``."""
    from pipeline.zoo import regression_mlp

    model = train(regression_mlp(), regression_task(), io_of(), "regression", epochs=60, lr=1e-2)
    return save_state_dict(model.state_dict(), out / "regression.pt")


def write_image_meta(out: Path) -> Path:
    """The image + metadata classifier's state_dict, ``out/image_meta.pt``."""
    from pipeline.zoo import image_meta_net

    inputs = [{"name": "image", "shape": ["batch", 1, 8, 8]}, {"name": "meta", "shape": ["batch", 4]}]
    model = train(image_meta_net(), image_meta_task(), io_of(inputs, prediction=0), "classification", epochs=4, lr=3e-3)
    return save_state_dict(model.state_dict(), out / "image_meta.pt")


def write_dataparallel(out: Path) -> Path:
    """The digits CNN as a pytorch-cifar training dict of DataParallel weights, ``out/dataparallel.pt``."""
    from pipeline.torchkit.data import digits
    from pipeline.zoo import digits_cnn

    model = train(digits_cnn(), digits(), io_of(), "classification", epochs=4, lr=3e-3)
    return save_state_dict({"net": nn.DataParallel(model).state_dict(), "acc": 97.0, "epoch": 4}, out / "dataparallel.pt")


def save_state_dict(state: dict[str, Any], path: Path) -> Path:
    """``torch.save`` into ``path`` (folders made), returning it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


WRITERS: dict[str, Callable[[Path], Path]] = {
    "bert": write_bert, "lstm": write_lstm, "regression": write_regression, "image-meta": write_image_meta,
    "dataparallel": write_dataparallel,
}


def write_example(name: str, out: Path, seed: int = 0) -> Path:
    """Train example ``name`` (seeded) and save its checkpoint under ``out``; the checkpoint's path."""
    torch.manual_seed(seed)
    return WRITERS[name](Path(out))
