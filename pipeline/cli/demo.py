"""``optipipe demo``: train the ``digits_cnn`` baseline on scikit-learn's digits, then run ``recipes/demo.yaml`` on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import console, finish_run, store_root
from pipeline.cli.review import write_report
from pipeline.cli.run import run_flow

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def command_demo(args: argparse.Namespace) -> int:
    """optipipe demo: train the digits baseline, then run recipes/demo.yaml on it."""
    from pipeline.torchkit.demo_baseline import train_demo_checkpoint

    checkpoint_path = Path(args.out) / "digits_cnn.pt"
    console.print(f"training digits_cnn on scikit-learn digits ({args.epochs} epochs) ...")
    trained = train_demo_checkpoint(checkpoint_path, epochs=args.epochs)
    console.print(f"saved {checkpoint_path} (eval top-1 {trained['eval_top1']:.2%}, loss {trained['loss']:.4f})")
    record = run_flow(str(DEMO_RECIPE), str(checkpoint_path), store_root(args), [])
    exit_code = finish_run(record, args.debug)
    for path in write_report(record, str(Path(args.out) / "report.html"), None):
        console.print(f"report: {Path(path).resolve()}")
    return exit_code
