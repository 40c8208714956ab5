"""``optipipe demo``: train the ``digits_cnn`` baseline on scikit-learn's digits, then run ``recipes/demo.yaml`` on it.

Training is deterministic, so an earlier ``<out>/digits_cnn.pt`` is reused when it was trained from the same
inputs: ``digits_cnn.pt.json`` beside it records the epochs, the seed, the digest of the training code
(``pipeline.torchkit.demo_baseline`` and every project module it imports) and the torch version, with the
checkpoint's sha256 and figures. Any difference, a missing or damaged record, or a checkpoint whose bytes no
longer match retrains it; the record is written only after the checkpoint is saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.cli.common import console, finish_run, store_root
from pipeline.cli.review import write_report
from pipeline.cli.run import run_flow

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
DEMO_SEED = 0
TRAINING_CODE = "pipeline.torchkit.demo_baseline"


def training_record_path(checkpoint_path: Path) -> Path:
    """Where a demo checkpoint's training inputs are recorded: ``<checkpoint>.json`` beside it."""
    return checkpoint_path.with_name(f"{checkpoint_path.name}.json")


def training_inputs(epochs: int, seed: int) -> dict[str, Any]:
    """What the trained weights depend on: epochs, seed, the training code's digest and the torch version."""
    import torch

    from pipeline.run.code_digest import code_digest

    return {"epochs": epochs, "seed": seed, "code_digest": code_digest(TRAINING_CODE), "torch": torch.__version__}


def reusable_training(checkpoint_path: Path, inputs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The training record of a checkpoint trained from ``inputs`` (else None), and why it is or is not reused."""
    from pipeline.records.files import sha256_file

    record_path = training_record_path(checkpoint_path)
    if not checkpoint_path.is_file() or not record_path.is_file():
        return None, "no earlier checkpoint with a training record"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None, f"{record_path.name} is unreadable"
    if not isinstance(record, dict):
        return None, f"{record_path.name} is not a JSON object"
    changed = [name for name, value in inputs.items() if record.get(name) != value]
    if changed:
        return None, f"{', '.join(changed)} changed since it was trained"
    if record.get("sha256") != sha256_file(checkpoint_path):
        return None, f"{checkpoint_path.name} no longer matches its recorded sha256"
    return record, "training inputs unchanged"


def demo_checkpoint(checkpoint_path: Path, epochs: int) -> dict[str, Any]:
    """Reuse or train the demo checkpoint, saying which and why; its figures (``loss``, ``eval_top1``)."""
    from pipeline.records.files import sha256_file, write_json_atomic
    from pipeline.torchkit.demo_baseline import train_demo_checkpoint

    inputs = training_inputs(epochs, DEMO_SEED)
    record, reason = reusable_training(checkpoint_path, inputs)
    if record is not None:
        console.print(f"reused {checkpoint_path} ({reason}: {epochs} epochs, seed {DEMO_SEED}; eval top-1 "
                      f"{record['eval_top1']:.2%}); delete {training_record_path(checkpoint_path)} to retrain")
        return record
    console.print(f"training digits_cnn on scikit-learn digits ({epochs} epochs; {reason}) ...")
    figures = train_demo_checkpoint(checkpoint_path, epochs=epochs, seed=DEMO_SEED)
    write_json_atomic(training_record_path(checkpoint_path), {**inputs, **figures, "sha256": sha256_file(checkpoint_path)})
    console.print(f"saved {checkpoint_path} (eval top-1 {figures['eval_top1']:.2%}, loss {figures['loss']:.4f})")
    return figures


def command_demo(args: argparse.Namespace) -> int:
    """optipipe demo: train the digits baseline (or reuse it when its training inputs are unchanged), then run
    recipes/demo.yaml on it."""
    checkpoint_path = Path(args.out) / "digits_cnn.pt"
    demo_checkpoint(checkpoint_path, args.epochs)
    record = run_flow(str(DEMO_RECIPE), str(checkpoint_path), store_root(args), [])
    exit_code = finish_run(record, args.debug)
    for path in write_report(record, str(Path(args.out) / "report.html"), None):
        console.print(f"report: {Path(path).resolve()}")
    return exit_code


EXAMPLE_RECIPES = {"bert": "bert.yaml", "lstm": "lstm-int8.yaml", "regression": "regression.yaml", "image-meta": "image-meta.yaml",
                   "dataparallel": "cpu-int8.yaml"}


def command_example(args: argparse.Namespace) -> int:
    """optipipe example NAME: train one of the example models of other shapes and save its checkpoint."""
    from pipeline.examples import write_example

    console.print(f"training the {args.name} example (offline data, seeded) ...")
    checkpoint = write_example(args.name, Path(args.out))
    recipe = DEMO_RECIPE.parent / EXAMPLE_RECIPES[args.name]
    console.print(f"saved {checkpoint}")
    console.print(f"optimize it: optipipe run {recipe.relative_to(Path.cwd()) if recipe.is_relative_to(Path.cwd()) else recipe} --checkpoint {checkpoint}")
    return 0
