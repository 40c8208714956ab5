"""Search benchmark: what ``select`` picks against the first passing candidate a first-pass tuner would stop at.

    python bench/search.py [--out bench-out/search] [--models digits,digits32] [--skip-fallback]

For each model, a search recipe (ONNX Runtime INT8 over calibration method x per-channel weights, and channel
pruning amounts distilled from FP32 then INT8) runs through ``run_plan`` in a fresh store; its ``select`` stage
times every candidate on onnxruntime in interleaved rounds with the FP32 eager baseline. A first-pass tuner
(Intel Neural Compressor's autotune, NNCF's accuracy control) tries quantization configurations in order and
stops at the first that meets the budget: here that order is the INT8 branches in matrix order, then the pruned
models by amount. Printed: both picks with their latency as ratios to FP32 eager and to onnxruntime FP32, all
measured in the same select stage, and how much faster the chosen one is than the first passing one.

The fallback part builds a model on which plain static INT8 misses the budget: the demo CNN with a weight
outlier (``pipeline.zoo.add_weight_outlier``: one BatchNorm channel scaled down 1000x and the next conv's
weights reading it scaled up 1000x, so FP32 outputs are unchanged but that conv's per-channel INT8 weight
scales are ruined), then compares ``quantize_onnx`` without and with ``fallback: auto``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from compress import NoAliasDumper, demo_checkpoint, train_digits32_resnet  # noqa: E402

from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.records.store import ArtifactStore  # noqa: E402
from pipeline.records.variants import read_variants, selection_reports  # noqa: E402
from pipeline.run.engine import run_plan  # noqa: E402
from pipeline.run.measure import load_average  # noqa: E402
from pipeline.torchkit.data import digits  # noqa: E402
from pipeline.torchkit.train import train_model  # noqa: E402
from pipeline.zoo import add_weight_outlier, digits_cnn  # noqa: E402

THREADS = 2
BUDGET = 0.005  # half a point of top-1
INT8_MATRIX = {"calibrate_method": ["minmax", "entropy", "percentile"], "per_channel": [True, False]}
AMOUNTS = [0.25, 0.5]
TIMING = {"warmup": 10, "iterations": 30, "min_seconds": 1.0, "rounds": 3}
MODELS: dict[str, dict[str, Any]] = {
    "digits": {"title": "demo digits_cnn, digits 8x8", "make": demo_checkpoint,
               "model": {"factory": "pipeline.zoo:digits_cnn", "input_shape": [1, 1, 8, 8]},
               "data": {"source": "digits", "batch_size": 64}},
    "digits32": {"title": "resnet_small (width 32), digits upscaled to 32x32", "make": train_digits32_resnet,
                 "model": {"factory": "pipeline.zoo:resnet_small", "kwargs": {"width": 32}, "input_shape": [1, 1, 32, 32]},
                 "data": {"source": "digits", "batch_size": 64, "kwargs": {"size": 32}}},
}


def search_recipe(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The search recipe of one model: INT8 matrix and pruning amounts, then select on onnxruntime."""
    stages: dict[str, Any] = {
        "load": {"uses": "load_checkpoint"},
        "fused": {"uses": "fuse_conv_bn", "needs": ["load"]},
        "onnx": {"uses": "export_onnx", "needs": ["fused"]},
        "int8": {"uses": "quantize_onnx", "needs": ["onnx"], "with": {"mode": "static", "calibration_batches": 16},
                 "matrix": INT8_MATRIX},
        "pruned": {"uses": "prune", "needs": ["fused"], "with": {"method": "channels"}, "matrix": {"amount": AMOUNTS}},
        "distilled": {"uses": "distill", "needs": ["pruned"], "with": {"epochs": 30, "lr": 0.002, "temperature": 4.0, "alpha": 0.9}},
        "pd_onnx": {"uses": "export_onnx", "needs": ["distilled"]},
        "pd_int8": {"uses": "quantize_onnx", "needs": ["pd_onnx"], "with": {"mode": "static", "calibration_batches": 16}},
        "pick": {"uses": "select", "needs": ["onnx", "int8", "pd_onnx", "pd_int8"],
                 "with": {"target": "onnxruntime-cpu", "max_drop": BUDGET, **TIMING}},
    }
    return {"name": f"bench-search-{name}", "model": spec["model"], "data": spec["data"], "stages": stages}


def run_recipe(recipe: dict[str, Any], checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """Write the recipe and run it in a fresh store under ``workdir``; the run record."""
    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.dump(recipe, Dumper=NoAliasDumper, sort_keys=False))
    return run_plan(load_recipe(path), ArtifactStore(workdir / "store"), checkpoint)


def tuner_order(candidates: list[str]) -> list[str]:
    """The order a first-pass tuner tries candidates in: quantization configurations first, then pruning amounts."""
    return [name for name in candidates if name.startswith("int8[")] + [name for name in candidates if name.startswith("pd_")]


def compare_picks(record: dict[str, Any]) -> dict[str, Any]:
    """select's choice and the first passing candidate in tuner order, with their figures from the same stage."""
    (_, report), = selection_reports(record)
    candidates = report.candidates
    first = next((name for name in tuner_order(list(candidates)) if candidates[name].meets_budget), None)
    ort_fp32 = candidates["onnx"].latency_p50_ms

    def row(name: str) -> dict[str, Any]:
        figures = candidates[name]
        return {"variant": name, "latency_ms": figures.latency_p50_ms, "drop_pt": round(figures.drop * 100, 6) + 0.0, "size_bytes": figures.size_bytes,
                "x_eager": report.baseline.latency_p50_ms / figures.latency_p50_ms, "x_ort_fp32": ort_fp32 / figures.latency_p50_ms}

    return {"chosen": row(report.chosen), "first_passing": row(first) if first else None,
            "chosen_vs_first": candidates[first].latency_p50_ms / candidates[report.chosen].latency_p50_ms if first else None,
            "candidates": len(candidates)}


def outlier_checkpoint(workdir: Path) -> Path:
    """The demo CNN trained briefly, then given a weight outlier that ruins plain INT8 but not FP32."""
    torch.manual_seed(0)
    model = digits_cnn()
    train_model(model, digits(batch_size=64, seed=0)[0], epochs=4, lr=3e-3, description="train digits_cnn")
    add_weight_outlier(model.eval())
    path = workdir / "outlier.pt"
    torch.save(model.state_dict(), path)
    return path


def fallback_figures(workdir: Path) -> list[dict[str, Any]]:
    """Top-1 drop and latency of plain static INT8 and of ``fallback: auto`` on the outlier model, timed together."""
    int8 = {"mode": "static", "calibration_batches": 16, "min_agreement": 0.0}
    recipe = {
        "name": "bench-fallback", "model": MODELS["digits"]["model"], "data": MODELS["digits"]["data"],
        "stages": {
            "load": {"uses": "load_checkpoint"},
            "onnx": {"uses": "export_onnx", "needs": ["load"]},
            "plain_int8": {"uses": "quantize_onnx", "needs": ["onnx"], "with": int8},
            "fallback_int8": {"uses": "quantize_onnx", "needs": ["onnx"], "with": {**int8, "fallback": "auto", "max_drop": 0.02}},
            "check": {"uses": "validate", "needs": ["onnx", "plain_int8", "fallback_int8"], "with": {"max_drop": 1.0}},
            "bench": {"uses": "benchmark", "needs": ["onnx", "plain_int8", "fallback_int8"], "with": {"batch_sizes": [1], **TIMING}},
        },
    }
    record = run_recipe(recipe, outlier_checkpoint(workdir), workdir)
    if record["state"] != "succeeded":
        raise SystemExit(f"fallback run {record['state']}: {record.get('message')}")
    kept = next(stage for stage in record["stages"] if stage["name"] == "fallback_int8")["metrics"]["fallback"]["layers"]
    variants = {variant.name: variant for variant in read_variants(record)}
    eager, ort = variants["load"].benchmark.batches["1"].p50_ms, variants["onnx"].benchmark.batches["1"].p50_ms
    rows = []
    for name in ("onnx", "plain_int8", "fallback_int8"):
        variant = variants[name]
        latency = variant.benchmark.batches["1"].p50_ms
        rows.append({"variant": name, "top1": variant.validation.top1, "drop_pt": -variant.validation.delta_top1 * 100,
                     "latency_ms": latency, "x_eager": eager / latency, "x_ort_fp32": ort / latency,
                     "kept_fp32": [layer.get("module_path") or layer["name"] for layer in kept] if name == "fallback_int8" else []})
    return rows


def picks_table(title: str, picks: dict[str, Any]) -> Table:
    """select's choice against the first passing candidate, as ratios to FP32 eager and to onnxruntime FP32."""
    table = Table(title=f"{title} · {picks['candidates']} candidates · budget {BUDGET * 100:.1f} pt top-1 · {THREADS} threads")
    for header in ("pick", "variant", "drop pt", "b1 ms", "×eager", "×ORT32", "size"):
        table.add_column(header, justify="left" if header in ("pick", "variant") else "right")
    for label, row in (("select (fastest within budget)", picks["chosen"]), ("first passing (tuner order)", picks["first_passing"])):
        if row is None:
            table.add_row(label, "none passed", *["-"] * 5)
            continue
        table.add_row(label, escape(row["variant"]), f"{row['drop_pt'] + 0.0:.2f}", f"{row['latency_ms']:.4f}", f"{row['x_eager']:.2f}",
                      f"{row['x_ort_fp32']:.2f}", f"{row['size_bytes'] / 1e3:.1f} kB")
    return table


def fallback_table(rows: list[dict[str, Any]]) -> Table:
    """Plain INT8 against fallback: auto on the outlier model."""
    table = Table(title="fallback: auto on the demo CNN with a weight outlier (budget 2 pt) · batch 1")
    for header in ("variant", "top-1", "drop pt", "b1 ms", "×eager", "×ORT32", "kept FP32"):
        table.add_column(header, justify="left" if header in ("variant", "kept FP32") else "right")
    for row in rows:
        table.add_row(row["variant"], f"{row['top1']:.2%}", f"{row['drop_pt']:.2f}", f"{row['latency_ms']:.4f}", f"{row['x_eager']:.2f}",
                      f"{row['x_ort_fp32']:.2f}", ", ".join(row["kept_fp32"]) or "-")
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the searches and the fallback comparison; print the tables and write search.json under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/search", help="folder for search.json and the runs' stores")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--skip-fallback", action="store_true", help="only the searches")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    console = Console(width=None if sys.stdout.isatty() else 200)
    out = Path(args.out)
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        workdir = out / name  # a fresh store: every stage runs, nothing cached
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        console.print(f"[bold]{MODELS[name]['title']}[/]: running its search ...")
        record = run_recipe(search_recipe(name, MODELS[name]), MODELS[name]["make"](workdir), workdir)
        if record["state"] != "succeeded":
            console.print(f"[red]{name}: run {record['state']}: {record.get('message')}[/]")
            return 1
        results[name] = {**compare_picks(record), "load_average": load_average()}
        console.print(picks_table(MODELS[name]["title"], results[name]))
        console.print(f"load average when it ended: {results[name]['load_average']} ({torch.get_num_threads()} threads, 2 cores)")
    if not args.skip_fallback:
        workdir = out / "fallback"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        results["fallback"] = fallback_figures(workdir)
        console.print(fallback_table(results["fallback"]))
        console.print(f"load average when it ended: {load_average()}")
    (out / "search.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out / 'search.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
