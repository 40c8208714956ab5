"""Compression benchmark: FP32 eager against every compressed variant, on four models, in one run.

    python bench/compress.py [--out bench-out] [--models digits,digits32,resnet18,bert]

Each model goes through a real optipipe recipe (``run_plan``, no Prefect, in a fresh store under
``--out``/work so nothing is reused from a cache and the artifacts stay for inspection): fuse, quantize (torch dynamic and static, onnxruntime static QDQ), export ONNX, and
OpenVINO (FP32 from the ONNX file, ORT's INT8 file run natively, NNCF INT8), AOTInductor and TorchScript, and
for models with real labels prune half the channels, distill from FP32 and quantize that. The recipe's
``benchmark`` stage times every variant after warm-up at batch 1 and 8 with the FP32 eager baseline
measured in the same stage; ``validate`` gives top-1 (or agreement with FP32 where labels mean nothing).
The ``bert`` row is a BERT-style encoder (4 layers, hidden 256, random weights, a Hugging Face
``save_pretrained`` folder) at sequence 128: FP32 eager, torch dynamic INT8 and onnxruntime FP32 and dynamic INT8.
Printed: each variant as a ratio to FP32 eager and to onnxruntime FP32, then the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline import zoo  # noqa: E402
from pipeline.examples import tiny_bert  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.records.store import ArtifactStore  # noqa: E402
from pipeline.records.variants import read_variants  # noqa: E402
from pipeline.review.page import html_report  # noqa: E402
from pipeline.review.units import format_bytes  # noqa: E402
from pipeline.run.engine import run_plan  # noqa: E402
from pipeline.torchkit.data import digits  # noqa: E402
from pipeline.torchkit.demo_baseline import train_demo_checkpoint  # noqa: E402
from pipeline.torchkit.train import train_model  # noqa: E402

THREADS = 2
BATCHES = ["1", "8"]
INT8_STATIC = {"mode": "static", "calibrate_method": "minmax", "calibration_batches": 16}
# Variant stages every model gets (name: (uses, needs, with)); the FP32 eager baseline is `load`.
QUANTIZE_STAGES: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "fused": ("fuse_conv_bn", ["load"], {}),
    "torch_dynamic": ("quantize", ["fused"], {"mode": "dynamic"}),
    "torch_static": ("quantize", ["fused"], {"mode": "static", "calibration_batches": 16}),
    "onnx": ("export_onnx", ["fused"], {}),
    "onnx_int8": ("quantize_onnx", ["onnx"], INT8_STATIC),
    "ov": ("openvino", ["onnx"], {}),
    "ov_int8": ("openvino", ["onnx_int8"], {}),
    "ov_nncf": ("openvino", ["onnx"], {"quantize": "nncf"}),
    "aoti": ("compile", ["fused"], {}),
    "torchscript": ("torchscript", ["fused"], {}),
}
# Transformers: no conv-BN to fuse; dynamic INT8 of the Linear / MatMul layers in torch and in onnxruntime.
BERT_STAGES: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "torch_dynamic": ("quantize", ["load"], {"mode": "dynamic"}),
    "onnx": ("export_onnx", ["load"], {}),
    "onnx_int8": ("quantize_onnx", ["onnx"], {"mode": "dynamic"}),
}
BERT_SEQUENCE = 128
# Models with real labels also get the edge-small path: prune -> distill -> INT8.
EDGE_STAGES: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "pruned": ("prune", ["fused"], {"method": "channels", "amount": 0.5}),
    "distilled": ("distill", ["pruned"], {"epochs": 40, "lr": 0.002, "temperature": 4.0, "alpha": 0.9}),
    "pd_torch_static": ("quantize", ["distilled"], {"mode": "static", "calibration_batches": 16}),
    "pd_onnx": ("export_onnx", ["distilled"], {}),
    "pd_onnx_int8": ("quantize_onnx", ["pd_onnx"], INT8_STATIC),
}
INT8_VARIANTS = ("torch_static", "onnx_int8", "ov_int8", "ov_nncf")
FP32_VARIANTS = ("fused", "onnx", "ov", "aoti", "torchscript")  # no quantization: FP32 accuracy
EDGE_INT8_VARIANTS = ("pd_torch_static", "pd_onnx_int8")


@dataclass
class BenchModel:
    """One model of the benchmark: its recipe header, how its checkpoint is made, which stages it gets."""

    name: str
    title: str
    model: dict[str, Any]
    data: dict[str, Any]
    make_checkpoint: Callable[[Path], Path]
    real_labels: bool
    stages: dict[str, tuple[str, list[str], dict[str, Any]]] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        """The optipipe recipe this model is benchmarked with."""
        stages: dict[str, Any] = {"load": {"uses": "load_checkpoint"}}
        for name, (uses, needs, params) in self.stages.items():
            stages[name] = {"uses": uses, "needs": needs, "with": params}
        variants = [name for name, (uses, _, _) in self.stages.items() if uses not in ("prune",)]
        drop = 1.0  # validate reports every variant; the targets below judge the drops (a rejection would stop the run)
        stages["check"] = {"uses": "validate", "needs": variants, "with": {"max_drop": drop}}
        stages["bench"] = {"uses": "benchmark", "needs": variants,
                           "with": {"batch_sizes": [int(size) for size in BATCHES], "warmup": 10, "iterations": 30, "min_seconds": 1.0}}
        return {"name": f"bench-{self.name}", "model": self.model, "data": self.data, "stages": stages}


def demo_checkpoint(workdir: Path) -> Path:
    """The demo digits_cnn, trained as ``optipipe demo`` trains it."""
    path = workdir / "digits.pt"
    train_demo_checkpoint(path, epochs=15)
    return path


def train_digits32_resnet(workdir: Path) -> Path:
    """A small ResNet (width 32) trained on digits upscaled to 32x32: a model with real top-1 at a larger size."""
    path = workdir / "digits32.pt"
    torch.manual_seed(0)
    train_loader, _ = digits(batch_size=64, seed=0, size=32)
    model = zoo.resnet_small(width=32)
    optimizer, loss = train_model(model, train_loader, epochs=6, lr=3e-3, description="train resnet_small@32")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 6, "loss": loss}, path)
    return path


def random_resnet18(workdir: Path) -> Path:
    """ResNet-18 at 224 with seeded random weights and BatchNorm statistics settled on seeded inputs."""
    path = workdir / "resnet18.pt"
    torch.manual_seed(0)
    model = zoo.resnet18()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 224, 224))
    torch.save(model.eval().state_dict(), path)
    return path


def random_bert(workdir: Path) -> Path:
    """A BERT-style encoder (4 layers, hidden 256, 4 heads) with seeded random weights, saved with ``save_pretrained``."""
    torch.manual_seed(0)
    folder = workdir / "bert"
    tiny_bert(vocab_size=1024, hidden=256, layers=4, heads=4, intermediate=1024, max_positions=BERT_SEQUENCE).save_pretrained(folder)
    return folder


MODELS = {
    "digits": BenchModel(
        "digits", "demo digits_cnn, digits 8x8",
        {"factory": "pipeline.zoo:digits_cnn", "input_shape": [1, 1, 8, 8]}, {"source": "digits", "batch_size": 64},
        demo_checkpoint, True, QUANTIZE_STAGES | EDGE_STAGES,
    ),
    "digits32": BenchModel(
        "digits32", "resnet_small (width 32), digits upscaled to 32x32",
        {"factory": "pipeline.zoo:resnet_small", "kwargs": {"width": 32}, "input_shape": [1, 1, 32, 32]},
        {"source": "digits", "batch_size": 64, "kwargs": {"size": 32}}, train_digits32_resnet, True, QUANTIZE_STAGES | EDGE_STAGES,
    ),
    "resnet18": BenchModel(
        "resnet18", "ResNet-18-style, 3x224x224 (random weights: accuracy = agreement with FP32)",
        {"factory": "pipeline.zoo:resnet18", "input_shape": [1, 3, 224, 224]},
        {"source": "synthetic", "batch_size": 8, "kwargs": {"num_samples": 384, "num_classes": 10, "eval_fraction": 0.5}},
        random_resnet18, False, QUANTIZE_STAGES,
    ),
    "bert": BenchModel(
        "bert", f"BERT-style encoder (4 layers, hidden 256), sequence {BERT_SEQUENCE} (random weights: accuracy = agreement with FP32)",
        {"factory": "pipeline.hf:auto_model", "kwargs": {"auto_class": "AutoModelForSequenceClassification"},
         "inputs": [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": 1024},
                    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]}]},
        {"factory": "pipeline.examples:keyword_task",
         "kwargs": {"seq_len": BERT_SEQUENCE, "vocab_size": 1024, "samples": 64, "batch_size": 8, "eval_fraction": 0.5}},
        random_bert, False, BERT_STAGES,
    ),
}


class NoAliasDumper(yaml.SafeDumper):
    """Writes a value used twice (a shared ``needs`` list) out twice: recipes refuse YAML aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def run_recipe(bench_model: BenchModel, workdir: Path) -> dict[str, Any]:
    """Make the checkpoint, write the recipe, run every stage in order; returns the run record."""
    checkpoint = bench_model.make_checkpoint(workdir)
    recipe_path = workdir / f"{bench_model.name}.yaml"
    recipe_path.write_text(yaml.dump(bench_model.recipe(), Dumper=NoAliasDumper, sort_keys=False))
    return run_plan(load_recipe(recipe_path), ArtifactStore(workdir / "store"), checkpoint)


def collect(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: latency per batch, size, top-1, agreement (baseline first)."""
    rows = []
    for variant in read_variants(record):  # the baseline (load) first
        timing, accuracy = variant.benchmark, variant.validation
        rows.append({
            "variant": "FP32 eager" if variant.status == "baseline" else variant.name,
            "runtime": timing.runtime,
            "p50_ms": {size: timing.batches[size].p50_ms for size in BATCHES},
            "size_bytes": timing.size_bytes,
            "top1": accuracy.top1,
            "delta_top1": accuracy.delta_top1,
            "agreement": accuracy.agreement,
        })
    eager, ort = rows[0], next(row for row in rows if row["variant"] == "onnx")
    for row in rows:
        row["x_eager"] = {size: eager["p50_ms"][size] / row["p50_ms"][size] for size in BATCHES}
        row["x_ort_fp32"] = {size: ort["p50_ms"][size] / row["p50_ms"][size] for size in BATCHES}
        row["smaller"] = eager["size_bytes"] / row["size_bytes"]
    return rows


def model_table(bench_model: BenchModel, rows: list[dict[str, Any]]) -> Table:
    """One model's variants with ratios to FP32 eager and to onnxruntime FP32."""
    table = Table(title=f"{bench_model.title} · {THREADS} threads · median latency after warm-up")
    accuracy_header = "top-1 (Δ pt)" if bench_model.real_labels else "agreement"
    headers = ["variant", "runtime", "b1 ms", "b8 ms", "×eager b1", "×eager b8", "×ORT32 b1", "×ORT32 b8", "size", "×smaller", accuracy_header]
    for header in headers:
        table.add_column(header, justify="left" if header in ("variant", "runtime") else "right")
    for row in rows:
        accuracy = f"{row['top1']:.2%} ({row['delta_top1'] * 100:+.2f})" if bench_model.real_labels else f"{row['agreement']:.2%}"
        table.add_row(
            row["variant"], row["runtime"], *(f"{row['p50_ms'][size]:.3f}" for size in BATCHES),
            *(f"{row['x_eager'][size]:.2f}" for size in BATCHES), *(f"{row['x_ort_fp32'][size]:.2f}" for size in BATCHES),
            format_bytes(row["size_bytes"]), f"{row['smaller']:.2f}", accuracy,
        )
    return table


def best(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """The fastest (batch 1) of the named variants."""
    return min((row for row in rows if row["variant"] in names), key=lambda row: row["p50_ms"]["1"])


def targets(results: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, bool]]:
    """The issue's targets, each with the measured figure and whether it was met."""
    checks: list[tuple[str, str, bool]] = []
    if "resnet18" in results:
        int8 = best(results["resnet18"], INT8_VARIANTS)
        label = f"ResNet-18 224, best INT8 ({int8['variant']})"
        checks += [
            (f"{label}: ≥6× lower latency than FP32 eager at batch 1", f"{int8['x_eager']['1']:.2f}×", int8["x_eager"]["1"] >= 6),
            (f"{label}: ≥3× lower latency than ORT FP32 at batch 1", f"{int8['x_ort_fp32']['1']:.2f}×", int8["x_ort_fp32"]["1"] >= 3),
            (f"{label}: ≥3.9× smaller", f"{int8['smaller']:.2f}×", int8["smaller"] >= 3.9),
            (f"{label}: agreement with FP32 ≥99%", f"{int8['agreement']:.2%}", int8["agreement"] >= 0.99),
        ]
        fastest = best(results["resnet18"], tuple(row["variant"] for row in results["resnet18"][1:]))
        fp32 = best(results["resnet18"], FP32_VARIANTS)
        checks += [
            (f"ResNet-18 224: the fastest artifact ({fastest['variant']}, {fastest['runtime']}) ≥6× lower latency than FP32 eager at batch 1",
             f"{fastest['x_eager']['1']:.2f}×", fastest["x_eager"]["1"] >= 6),
            (f"ResNet-18 224: the fastest FP32-accuracy artifact ({fp32['variant']}, {fp32['runtime']}) ≥3× FP32 eager at batch 1",
             f"{fp32['x_eager']['1']:.2f}×", fp32["x_eager"]["1"] >= 3),
        ]
    for name in ("digits", "digits32"):
        if name not in results:
            continue
        int8 = best(results[name], INT8_VARIANTS)
        checks.append((f"{name}: best INT8 ({int8['variant']}) top-1 drop ≤0.5 pt", f"{-int8['delta_top1'] * 100 + 0.0:.2f} pt", -int8["delta_top1"] <= 0.005))
        edge = best(results[name], EDGE_INT8_VARIANTS)
        checks += [
            (f"{name}: pruned+distilled+INT8 ({edge['variant']}) ≥10× lower latency than FP32 eager at batch 1", f"{edge['x_eager']['1']:.2f}×", edge["x_eager"]["1"] >= 10),
            (f"{name}: pruned+distilled+INT8 ({edge['variant']}) top-1 drop ≤1 pt", f"{-edge['delta_top1'] * 100 + 0.0:.2f} pt", -edge["delta_top1"] <= 0.01),
        ]
    return checks


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and targets, write JSON and HTML reports under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out", help="folder for compress.json and the HTML reports")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    console = Console(width=None if sys.stdout.isatty() else 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        bench_model = MODELS[name]
        console.print(f"[bold]{bench_model.title}[/]: running its recipe ...")
        workdir = out / "work" / name  # checkpoint, recipe and a store of its own: every stage runs, nothing cached
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        record = run_recipe(bench_model, workdir)
        if record["state"] != "succeeded":
            console.print(f"[red]{name}: run {record['state']}: {record['message']}[/]")
            return 1
        (out / f"{name}.html").write_text(html_report(record))
        results[name] = collect(record)
        console.print(model_table(bench_model, results[name]))
    checks = targets(results)
    table = Table(title="targets")
    for header in ("target", "measured", "met"):
        table.add_column(header)
    for target, measured, met in checks:
        table.add_row(target, measured, "[green]yes[/]" if met else "[red]NO[/]")
    console.print(table)
    (out / "compress.json").write_text(json.dumps({"results": results, "targets": checks}, indent=2))
    console.print(f"wrote {out / 'compress.json'}, one HTML report per model in {out}/ and the artifacts in {out}/work/")
    return 0 if all(met for _, _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
