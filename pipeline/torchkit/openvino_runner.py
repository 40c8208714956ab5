"""Run an OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU, and profile it layer by layer.

OpenVINO is imported only when a runner is made: importing this module costs nothing on a machine without it.
The runner compiles for the CPU with as many threads as torch uses (``torch.get_num_threads()``, the count
the benchmark times every runtime with), a latency or throughput performance hint, and FP32 inference
precision: the CPU plugin's default on CPUs with AVX-512 BF16 or AMX is bf16, which would make an "FP32" IR
compute in half the mantissa on some machines and not on others.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.torchkit.model_io import Feeds

Hint = Literal["LATENCY", "THROUGHPUT"]
PROFILE_WARMUP = 10  # the first calls at a new shape run 10-70x slower in some layers (kernels made for the shape)
PROFILE_CALLS = 20


def compile_options(threads: int | None, hint: Hint, profiling: bool = False) -> dict[str, Any]:
    """The CPU plugin's properties: thread count (default torch's), performance hint, FP32 precision, per-layer counters."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    return {
        props.inference_num_threads: torch.get_num_threads() if threads is None else threads,
        hints.performance_mode: getattr(hints.PerformanceMode, hint),
        hints.inference_precision: ov.Type.f32,
        props.enable_profiling: profiling,
    }


class OpenVinoRunner:
    """Runs an OpenVINO model on the CPU device; its first output is the prediction, returned as float32.

    Feeds go to the model's inputs by name, cast to each input's element type (a one-input model takes the one
    feed whatever its name). ``path`` is the ``.xml`` file or an ``openvino.Model`` already in memory.
    """

    def __init__(self, path: Path | Any, threads: int | None = None, hint: Hint = "LATENCY"):
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path)) if isinstance(path, (str, Path)) else path
        self.threads, self.hint = threads, hint
        self.compiled = self.core.compile_model(self.model, "CPU", compile_options(threads, hint))
        self.request = self.compiled.create_infer_request()
        self.inputs = {port.get_any_name(): port.get_element_type().to_dtype() for port in self.compiled.inputs}

    def request_feeds(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The feeds by the model's input names and types; StageError naming a missing input."""
        if len(self.inputs) == 1 and len(feeds) == 1:
            (name, dtype), array = next(iter(self.inputs.items())), next(iter(feeds.values()))
            return {name: np.ascontiguousarray(array, dtype=dtype)}
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise StageError(f"the OpenVINO model takes inputs {', '.join(self.inputs)} but has no feed for {', '.join(missing)}")
        return {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self.inputs.items()}

    def predict(self, feeds: Feeds) -> np.ndarray:
        # shared buffers: the request reads the feeds in place and returns views of its outputs (copied here, only
        # the prediction): 12 µs of a 40 µs call on digits_cnn went to copying every input and output
        results = self.request.infer(self.request_feeds(feeds), share_inputs=True, share_outputs=True)
        return np.array(results[0], dtype=np.float32)

    def profile(self, feeds: Feeds, trace_path: Path) -> dict[str, float]:
        """Milliseconds per call by layer type at this batch (OpenVINO's per-layer counters: each layer's median over
        ``PROFILE_CALLS`` calls after ``PROFILE_WARMUP``), and a Chrome trace of one median call at ``trace_path``.

        A second compiled model with the counters on does the work, so this runner's timings stay unaffected.
        """
        compiled = self.core.compile_model(self.model, "CPU", compile_options(self.threads, self.hint, profiling=True))
        request = compiled.create_infer_request()
        inputs = self.request_feeds(feeds)
        for _ in range(PROFILE_WARMUP):
            request.infer(inputs)
        layers: dict[str, dict[str, Any]] = {}
        for _ in range(PROFILE_CALLS):
            request.infer(inputs)
            for info in request.profiling_info:
                if info.status != info.Status.EXECUTED:
                    continue
                layer = layers.setdefault(info.node_name, {"type": info.node_type, "exec_type": info.exec_type, "us": []})
                layer["us"].append(info.real_time.total_seconds() * 1e6)
        for layer in layers.values():
            layer["us"] = statistics.median(layer["us"])
        write_trace(trace_path, layers)
        by_type: dict[str, float] = defaultdict(float)
        for layer in layers.values():
            by_type[layer["type"]] += layer["us"] / 1e3
        return dict(sorted(by_type.items(), key=lambda item: -item[1]))


def write_trace(path: Path, layers: dict[str, dict[str, Any]]) -> None:
    """A Chrome-trace JSON of one median call: each executed layer a complete event, laid end to end in execution order."""
    events, start = [], 0.0
    for name, layer in layers.items():
        duration = layer["us"]
        events.append({"name": name, "cat": layer["type"], "ph": "X", "ts": round(start, 3), "dur": round(duration, 3),
                       "pid": 0, "tid": 0, "args": {"layer_type": layer["type"], "exec_type": layer["exec_type"]}})
        start += duration
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
