"""Torch-native deployment formats: AOTInductor packages (``compile`` stage) and TorchScript modules (``torchscript``).

Both stay model kind ``torch`` with a ``format`` in the handle's meta (``aoti``: ``model.pt2``; ``torchscript``:
``model.torchscript.pt``), so validate, benchmark and select take them like any torch variant; ``runner_for``
gives them a :class:`DeployedRunner`. Both take the declared inputs positionally, in declared order, and return a
flat tuple whose first element is the prediction (the wrapper ``stages/export_onnx.py`` exports), so one runner
serves both, whatever ``model.output`` says about the original model's outputs.

An AOTInductor package holds a compiled shared library: loading it needs torch only (``torch._inductor.aoti_load_package``:
no C++ compiler, no optipipe), but it runs only on a CPU with the instruction set it was built on (``-march=native``).
A TorchScript file is loaded with ``torch.jit.load``, which runs the code the file holds: only files optipipe itself
wrote into the digest-checked artifact store take that path; user checkpoints never go through ``torch.jit.load``
(see stages/load_checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows, feed_rows, feeds_length
from pipeline.torchkit.profiling import torch_profile

AOTI_FORMAT = "aoti"
TORCHSCRIPT_FORMAT = "torchscript"
DEPLOYED_FORMATS = (AOTI_FORMAT, TORCHSCRIPT_FORMAT)
AOTI_FILE = "model.pt2"
TORCHSCRIPT_FILE = "model.torchscript.pt"
EXAMPLE_ROWS = 8
JIT_WARMUP_CALLS = 3  # calls before the TorchScript profiling executor has settled on its optimised graph
FORMAT_NAMES = {AOTI_FORMAT: "AOTInductor package", TORCHSCRIPT_FORMAT: "TorchScript module"}


def load_deployed(path: Path, format: str) -> Callable[..., Any]:
    """The callable an AOTInductor package or a TorchScript file (written by optipipe's own stages) holds, on the CPU;
    a TorchScript module optimised for inference here (its oneDNN constants cannot be saved, see stages/torchscript.py)."""
    if format == AOTI_FORMAT:
        return torch._inductor.aoti_load_package(str(path))
    return torch.jit.optimize_for_inference(torch.jit.load(str(path), map_location="cpu").eval())


class DeployedRunner:
    """Runs an AOTInductor package or a TorchScript module on the CPU under ``inference_mode``.

    The declared inputs go in positionally, in declared order, floats as float32; the first output is the prediction.
    """

    def __init__(self, model: Callable[..., Any], io: ModelIO):
        self.model = model
        self.io = io

    @classmethod
    def of(cls, path: Path, format: str, io: ModelIO) -> "DeployedRunner":
        """The runner of a deployed file of this format."""
        return cls(load_deployed(path, format), io)

    def call(self, feeds: Feeds) -> Sequence[torch.Tensor]:
        """The model's outputs (a flat tuple, prediction first) for these feeds."""
        with torch.inference_mode():
            return self.model(*self.io.tensors(feeds, float_dtype=torch.float32).values())

    def outputs(self, feeds: Feeds) -> list[np.ndarray]:
        """Every output for these feeds, prediction first, as float32 numpy arrays."""
        return [tensor.float().cpu().numpy() for tensor in self.call(feeds)]

    def predict(self, feeds: Feeds) -> np.ndarray:
        return self.call(feeds)[0].float().cpu().numpy()

    def profile(self, feeds: Feeds, trace_path: Path) -> dict[str, float]:
        """Milliseconds per call of each op torch.profiler sees in a call on ``feeds`` (an AOTInductor package's kernels,
        built with ``cpp.enable_kernel_profile``; a TorchScript module's ``forward``), its Chrome trace at ``trace_path``.
        The TorchScript profiling executor optimises the graph over its first calls: they run before profiling."""
        for _ in range(JIT_WARMUP_CALLS):
            self.predict(feeds)
        return torch_profile(lambda: self.predict(feeds), trace_path)


def check_batches(eval_example: Feeds) -> tuple[Feeds, list[Feeds]]:
    """The feeds to capture the model with (at least 2 rows: torch.export specialises a batch of 1) and the batches
    parity is checked on: those rows and a single row."""
    export_feeds = cycled_rows(eval_example, max(feeds_length(eval_example), 2))
    return export_feeds, [export_feeds, feed_rows(eval_example, slice(0, 1))]


def check_parity(stage: str, format: str, runner: DeployedRunner, batches: Sequence[Feeds], expected: Sequence[Sequence[np.ndarray]],
                 tolerance: float) -> float:
    """The largest |deployed - input model| difference over every output and batch, as a fraction of the largest
    |input model output|; StageError (one line naming the batch and output) when over ``tolerance``."""
    worst = 0.0
    for feeds, reference in zip(batches, expected):
        got = runner.outputs(feeds)
        rows = feeds_length(feeds)
        if len(got) != len(reference):
            raise StageError(f"{stage}: the {FORMAT_NAMES[format]} gives {len(got)} outputs, the input model {len(reference)}")
        for index, (want, have) in enumerate(zip(reference, got)):
            if want.shape != have.shape:
                raise StageError(f"{stage}: output {index} of the {FORMAT_NAMES[format]} is shaped {list(have.shape)} at batch {rows}, "
                                 f"the input model's {list(want.shape)}; a shape was frozen into it")
            scale = max(float(np.max(np.abs(want))) if want.size else 0.0, np.finfo(np.float32).tiny)
            relative = float(np.max(np.abs(want - have))) / scale if want.size else 0.0
            if not relative <= tolerance:  # also catches NaN
                raise StageError(
                    f"{stage}: output {index} of the {FORMAT_NAMES[format]} differs from the input model's by {relative:.3g} of its "
                    f"largest value at batch {rows} (tolerance {tolerance:g}); raise 'tolerance' only if that is expected"
                )
            worst = max(worst, relative)
    return worst
