"""The compile (AOTInductor) and torchscript stages: parity, reload in a process without optipipe, validate and benchmark.

AOTInductor builds C++ for tens of seconds even for a tiny model, so one small CNN is compiled once for the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import StageError, StageUnavailable
from pipeline.run.contract import StageContext
from pipeline.torchkit.handles import TorchModel, save_torch_module
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.runners import runner_for
from pipeline.torchkit.torch_formats import AOTI_FILE, TORCHSCRIPT_FILE, DeployedRunner
from pipeline.zoo import digits_cnn
from stages import benchmark, torchscript, validate
from stages import compile as compile_stage
from tests.conftest import one_stage_recipe
from tests.test_fuse_export import Branchy, with_batchnorm_statistics

pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")
RECIPE = one_stage_recipe()
IO = ModelIO.of(RECIPE.model)
# Loads a deployed file and writes its first output on saved inputs, importing nothing but torch.
FRESH_PROCESS = """
import sys, torch
path, kind, inputs, outputs = sys.argv[1:]
model = torch._inductor.aoti_load_package(path) if kind == "aoti" else torch.jit.load(path)
with torch.inference_mode():
    torch.save(model(*torch.load(inputs))[0], outputs)
assert not any(name.split(".")[0] in ("pipeline", "stages") for name in sys.modules), "optipipe was imported"
"""


def make_context(folder: Path, data, name: str, baseline: TorchModel | None = None) -> StageContext:
    """A StageContext on the digits recipe with a fresh workdir ``folder/name``."""
    workdir = folder / name
    workdir.mkdir()
    return StageContext(name=name, workdir=workdir, recipe=RECIPE, checkpoint_path=None, load_data=lambda: data, baseline=baseline,
                        baseline_name="load" if baseline else None)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data) -> TorchModel:
    """A small digits CNN with BatchNorm statistics far from the identity, saved as an upstream stage would."""
    torch.manual_seed(0)
    return save_torch_module(with_batchnorm_statistics(digits_cnn(width=8)), tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, data, source):
    """The compile stage's output on the source model (built once: the C++ build is the slow part)."""
    return compile_stage.run(make_context(tmp_path_factory.mktemp("compile"), data, "compile"), {"load": source}, compile_stage.Params())


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, data, source):
    """The torchscript stage's output on the source model."""
    return torchscript.run(make_context(tmp_path_factory.mktemp("ts"), data, "ts"), {"load": source}, torchscript.Params())


def eager_prediction(source: TorchModel, inputs: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return source.load()(inputs).numpy()


def reload_in_fresh_process(tmp_path: Path, path: Path, kind: str, inputs: torch.Tensor) -> np.ndarray:
    """The first output of the file loaded in a new interpreter that imports only torch, with no C++ compiler on PATH."""
    torch.save((inputs,), tmp_path / "inputs.pt")
    env = {"PATH": str(tmp_path), "CXX": "/nonexistent/g++", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), kind, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "out.pt").numpy()


def test_compile_matches_the_input_model_at_two_batch_sizes(compiled, source, data):
    product, metrics = compiled.product, compiled.metrics
    assert product.kind == "torch" and product.meta["format"] == "aoti" and product.path.name == AOTI_FILE
    assert metrics["batch_sizes_checked"] == [8, 1] and metrics["max_relative_diff"] < 1e-4
    assert metrics["inductor_configs"] == {"freezing": True, "max_autotune": False, "cpp.threads": torch.get_num_threads(),
                                           "cpp.enable_kernel_profile": True}
    assert metrics["package_bytes"] == product.path.stat().st_size > 0 and metrics["compile_seconds"] > 0
    feeds = {"input": data.eval_set.inputs["input"][:13]}  # a batch size the check did not use
    runner = runner_for(product, IO)
    assert isinstance(runner, DeployedRunner)
    np.testing.assert_allclose(runner.predict(feeds), eager_prediction(source, torch.from_numpy(feeds["input"])), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["compiled", "scripted"])
def test_deployed_file_reloads_in_a_process_without_optipipe(request, tmp_path, source, data, fixture):
    product = request.getfixturevalue(fixture).product
    inputs = torch.from_numpy(data.eval_set.inputs["input"][:5])
    got = reload_in_fresh_process(tmp_path, product.path, product.meta["format"], inputs)
    np.testing.assert_allclose(got, eager_prediction(source, inputs), rtol=1e-4, atol=1e-5)


def test_torchscript_is_frozen_and_matches_the_input_model(scripted):
    product, metrics = scripted.product, scripted.metrics
    assert product.kind == "torch" and product.meta["format"] == "torchscript" and product.path.name == TORCHSCRIPT_FILE
    assert metrics["batch_sizes_checked"] == [8, 1] and metrics["max_relative_diff"] < 1e-4 and metrics["tracer_warnings"] == []
    module = product.load()
    assert isinstance(module, torch.jit.ScriptModule) and not list(module.parameters())  # frozen: weights are constants


def test_validate_benchmark_and_profile_take_both_formats(tmp_path, data, source, compiled, scripted):
    variants = {"compile": compiled.product, "ts": scripted.product}
    checked = validate.run(make_context(tmp_path, data, "check", source), variants, validate.Params())
    for name in variants:
        assert checked.metrics["variants"][name]["status"] == "accepted" and checked.metrics["variants"][name]["agreement"] == 1.0
    knobs = benchmark.Params(batch_sizes=[1, 4], warmup=1, iterations=3, min_seconds=0.01, rounds=1)
    timed = benchmark.run(make_context(tmp_path, data, "bench", source), variants, knobs)
    for name in variants:
        assert set(timed.metrics["variants"][name]["batches"]) == {"1", "4"}
    for name, product in variants.items():
        trace = tmp_path / f"{name}.trace.json"
        ops = runner_for(product, IO).profile({"input": data.eval_set.inputs["input"][:1]}, trace)
        assert ops and all(ms >= 0 for ms in ops.values()) and json.loads(trace.read_text())["traceEvents"]
        if name == "compile":  # the package's own fused kernels are seen, not only the aten ops it calls
            assert any("cpp_fused" in op for op in ops), ops


def test_an_aoti_package_is_not_a_module_later_stages_can_change(compiled):
    with pytest.raises(StageError, match="AOTInductor package .* put the stages that change the model before compile"):
        compiled.product.load()


def test_a_model_torch_export_cannot_capture_fails_in_one_line(tmp_path, data):
    branchy = save_torch_module(with_batchnorm_statistics(Branchy()), tmp_path)
    with pytest.raises(StageError) as raised:
        compile_stage.run(make_context(tmp_path, data, "compile"), {"load": branchy}, compile_stage.Params())
    message = str(raised.value)
    assert "\n" not in message and message.startswith("compile: torch.export could not capture the model")
    assert "test_fuse_export.py" in message and "if x.sum() > 0:" in message and "method: script" in message


def test_script_keeps_the_branch_that_trace_freezes(tmp_path, data):
    branchy = save_torch_module(with_batchnorm_statistics(Branchy()), tmp_path)
    traced = torchscript.run(make_context(tmp_path, data, "trace"), {"load": branchy}, torchscript.Params())
    assert any("Python boolean" in warning for warning in traced.metrics["tracer_warnings"])
    scripted = torchscript.run(make_context(tmp_path, data, "script"), {"load": branchy}, torchscript.Params(method="script"))
    negative = {"input": -data.eval_set.inputs["input"][:4] - 1}  # x.sum() < 0: the branch the eval example never took
    reference = branchy.load()(torch.from_numpy(negative["input"])).detach().numpy()
    np.testing.assert_allclose(runner_for(scripted.product, IO).predict(negative), reference, rtol=1e-4, atol=1e-5)
    assert not np.allclose(runner_for(traced.product, IO).predict(negative), reference, atol=1e-3)


@pytest.mark.parametrize(("on_unavailable", "error"), [("skip", StageUnavailable), ("fail", StageError)])
def test_without_a_cpp_compiler_the_stage_says_so(tmp_path, data, source, on_unavailable, error):
    no_compiler = torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")})
    with no_compiler, pytest.raises(error, match="no C\\+\\+ compiler for AOTInductor .*install g\\+\\+ or point CXX at one"):
        compile_stage.run(make_context(tmp_path, data, "compile"), {"load": source}, compile_stage.Params(on_unavailable=on_unavailable))
