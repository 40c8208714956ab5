"""Tests of the load_checkpoint and strip_optimizer stages, run directly (no Prefect)."""

from __future__ import annotations

import json
import pathlib
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.errors import CheckpointError, RecipeError, StageError
from pipeline.recipe import Recipe
from pipeline.run.contract import StageContext
from pipeline.torchkit.handles import save_torch_module
from pipeline.zoo import digits_cnn, mlp
from stages import load_checkpoint, strip_optimizer

INPUT_SHAPE = (4, 1, 8, 8)


def make_recipe(model: dict | None = None) -> Recipe:
    return Recipe.model_validate({
        "name": "t",
        "model": model or {"factory": "pipeline.zoo:digits_cnn", "input_shape": [1, 1, 8, 8]},
        "stages": {"load": {"uses": "load_checkpoint"}},
    })


def make_context(tmp_path: Path, checkpoint: Path | None, name: str = "load", recipe: Recipe | None = None) -> StageContext:
    workdir = Path(tempfile.mkdtemp(prefix=f"work-{name}-", dir=tmp_path))  # a fresh one per stage run
    return StageContext(
        name=name, workdir=workdir, recipe=recipe or make_recipe(), checkpoint_path=checkpoint, load_data=lambda: None
    )


def load(tmp_path: Path, checkpoint: Path, **params):
    """Run load_checkpoint on ``checkpoint`` and return its StageOutput."""
    ctx = make_context(tmp_path, checkpoint)
    return load_checkpoint.run(ctx, {}, load_checkpoint.Params(**params))


@pytest.fixture
def source_model() -> torch.nn.Module:
    """A digits_cnn with non-default weights and BatchNorm statistics, so a wrong load shows in the outputs."""
    torch.manual_seed(0)
    model = digits_cnn()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def assert_same_outputs(output, source: torch.nn.Module) -> None:
    loaded = output.product.load()
    assert output.product.path.parent.name.startswith("work-")
    json.dumps(output.metrics)
    batch = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(batch), source(batch), atol=1e-6)


def training_dict(model: torch.nn.Module) -> dict:
    """The usual training-loop checkpoint, with real Adam state (one step taken)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randn(INPUT_SHAPE)).sum().backward()
    optimizer.step()
    model.eval()
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 7, "loss": 0.25}


def test_plain_state_dict(tmp_path, source_model):
    path = tmp_path / "weights.pth"
    torch.save(source_model.state_dict(), path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    metrics = output.metrics
    assert metrics["format"] == "state_dict" and metrics["prefix_stripped"] is None
    assert metrics["tensors_loaded"] == len(source_model.state_dict())
    assert metrics["parameters"] == sum(p.numel() for p in source_model.parameters())
    assert metrics["checkpoint_bytes"] == path.stat().st_size and not metrics["has_optimizer_state"]


def test_training_dict_metrics(tmp_path, source_model):
    path = tmp_path / "epoch7.ckpt"
    torch.save(training_dict(source_model), path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    assert output.metrics["format"] == "training_dict"
    assert output.metrics["epoch"] == 7 and output.metrics["has_optimizer_state"] is True
    assert output.metrics["extra_entries"] == ["epoch", "loss", "optimizer_state_dict"]


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_weights_under_other_keys(tmp_path, source_model, key):
    path = tmp_path / "ckpt.pt"
    torch.save({key: source_model.state_dict(), "step": 3}, path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    assert output.metrics["extra_entries"] == ["step"] and "epoch" not in output.metrics


@pytest.mark.parametrize("prefix", ["module.", "model."])
def test_wrapper_prefix_is_stripped(tmp_path, source_model, prefix):
    path = tmp_path / "wrapped.pt"
    weights = {prefix + name: tensor for name, tensor in source_model.state_dict().items()}
    container = {"state_dict": weights, "optimizer_states": [], "epoch": 2} if prefix == "model." else weights
    torch.save(container, path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    assert output.metrics["prefix_stripped"] == prefix
    assert output.metrics["has_optimizer_state"] is False  # Lightning's optimizer_states is empty here


def test_safetensors_by_suffix_and_by_content(tmp_path, source_model):
    from safetensors.torch import save_file

    for name in ("model.safetensors", "model.bin"):
        path = tmp_path / name
        save_file(source_model.state_dict(), str(path))
        output = load(tmp_path, path)
        assert output.metrics["format"] == "safetensors"
        assert_same_outputs(output, source_model)


def test_torchscript(tmp_path, source_model):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(source_model), str(path))
    output = load(tmp_path, path, allow_pickle=True)  # torch.jit.load runs the archive's code: trusted files only
    assert output.metrics["format"] == "torchscript"
    assert_same_outputs(output, source_model)


def test_torch_export(tmp_path, source_model):
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(source_model, (torch.randn(1, 1, 8, 8),)), path)
    output = load(tmp_path, path)
    assert output.metrics["format"] == "torch_export"
    assert_same_outputs(output, source_model)


def test_pickled_module_refused_without_opt_in(tmp_path, source_model):
    path = tmp_path / "full.pt"
    torch.save(source_model, path)
    with pytest.raises(CheckpointError) as caught:
        load(tmp_path, path)
    message = str(caught.value)
    assert "pickled Python objects" in message and "execute code" in message
    assert "allow_pickle: true" in message and "pipeline.zoo.DigitsCNN" in message


def test_pickled_module_accepted_with_opt_in(tmp_path, source_model):
    path = tmp_path / "full.pt"
    torch.save(source_model, path)
    output = load(tmp_path, path, allow_pickle=True)
    assert output.metrics["format"] == "pickled_module"
    assert_same_outputs(output, source_model)


class TouchOnLoad:
    """Unpickling this creates ``marker``: stands for any code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_never_runs(tmp_path, source_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": source_model.state_dict(), "note": TouchOnLoad(marker)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle: true"):
        load(tmp_path, path)
    assert not marker.exists()


def test_export_archive_with_pickled_sample_inputs_is_refused(tmp_path, source_model):
    """torch.export.load falls back to an unrestricted unpickle of sample inputs; we refuse such archives first."""
    marker = tmp_path / "pwned"
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(source_model, (torch.randn(1, 1, 8, 8),)), clean)
    evil_inputs = tmp_path / "inputs.pt"
    torch.save(({"x": TouchOnLoad(marker)},), evil_inputs)
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = evil_inputs.read_bytes() if item.filename.endswith("sample_inputs/model.pt") else source.read(item)
            target.writestr(item, data)
    with pytest.raises(CheckpointError, match="allow_pickle: true"):
        load(tmp_path, path)
    assert not marker.exists()


UNREADABLE = {
    "empty": ("model.pt", b"", "empty"),
    "random": ("model.pt", torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
               .numpy().tobytes(), "not a pickle"),
    "text": ("model.pt", b"epoch,loss\n1,0.5\n", "text file"),
    "onnx": ("model.onnx", b"\x08\x09\x12\x07pytorch\x1a\x062.13.0:\x8a\x01\n" + bytes(64), "ONNX"),
    "broken-safetensors": ("model.safetensors", b"\x10" + bytes(7) + b"{not json}", "safetensors"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_files(tmp_path, case):
    name, content, reason = UNREADABLE[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as caught:
        load(tmp_path, path)
    assert reason in str(caught.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="needs a checkpoint file"):
        load(tmp_path, tmp_path / "nowhere.pt")


def test_legacy_format(tmp_path, source_model):
    """torch.save's pre-1.6 (non-zip) format: weights load; a pickled module is refused, its class named."""
    path = tmp_path / "legacy.pt"
    torch.save(source_model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert_same_outputs(load(tmp_path, path), source_model)
    module_path = tmp_path / "legacy-module.pt"
    torch.save(source_model, module_path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="allow_pickle: true") as caught:
        load(tmp_path, module_path)
    assert "pipeline.zoo.DigitsCNN" in str(caught.value)


def test_truncated_checkpoint(tmp_path, source_model):
    full = tmp_path / "full.pt"
    torch.save(source_model.state_dict(), full)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load(tmp_path, path)


def test_nan_weights(tmp_path, source_model):
    weights = source_model.state_dict()
    weights["classifier.weight"][0, 0] = float("nan")
    weights["features.0.1.running_var"][0] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match="NaN or Inf") as caught:
        load(tmp_path, path)
    assert "classifier.weight" in str(caught.value) and "features.0.1.running_var" in str(caught.value)


def test_strict_mismatch_names_keys(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), path)
    with pytest.raises(CheckpointError) as caught:
        load(tmp_path, path)
    message = str(caught.value)
    assert "features.0.0.weight" in message and "net.1.weight" in message and "model.factory" in message
    assert "none of its 16 tensors fits" in message and "strict: false" not in message  # nothing would load
    assert "starts with 'net.'" in message and 'strip_prefix: "net."' in message
    with pytest.raises(CheckpointError, match="none of its 16 tensors fits"):
        load(tmp_path, path, strict=False)


def test_strict_mismatch_advises_strict_false_when_some_tensors_fit(tmp_path, source_model):
    weights = source_model.state_dict()
    weights["head.extra"] = torch.zeros(2)
    path = tmp_path / "extra.pt"
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match="strict: false") as caught:
        load(tmp_path, path)
    assert "unexpected in the checkpoint (1): head.extra" in str(caught.value) and "strip_prefix" not in str(caught.value)


def test_strict_mismatch_names_shapes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "narrow.pt"
    torch.save(digits_cnn(width=16).state_dict(), path)
    with pytest.raises(CheckpointError) as caught:
        load(tmp_path, path)
    assert "features.0.0.weight: checkpoint (16, 1, 3, 3) vs model (32, 1, 3, 3)" in str(caught.value)


def test_not_strict_records_what_it_skipped(tmp_path, source_model):
    weights = source_model.state_dict()
    del weights["classifier.bias"]
    weights["classifier.weight"] = torch.zeros(3, 64)
    weights["head.extra"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save(weights, path)
    metrics = load(tmp_path, path, strict=False).metrics
    assert metrics["missing_keys"] == ["classifier.bias"]
    assert metrics["unexpected_keys"] == ["head.extra"]
    assert metrics["mismatched_keys"] == ["classifier.weight"]
    assert metrics["tensors_loaded"] == len(source_model.state_dict()) - 2
    loaded = load(tmp_path, path, strict=False).product.load()
    assert torch.equal(loaded.features[0][0].weight, source_model.features[0][0].weight)


def test_failing_factory_is_a_recipe_error(tmp_path, source_model):
    path = tmp_path / "weights.pt"
    torch.save(source_model.state_dict(), path)
    recipe = make_recipe({"factory": "pipeline.zoo:digits_cnn", "kwargs": {"depth": 3}, "input_shape": [1, 1, 8, 8]})
    with pytest.raises(RecipeError, match="pipeline.zoo:digits_cnn"):
        load_checkpoint.run(make_context(tmp_path, path, recipe=recipe), {}, load_checkpoint.Params())


def test_declarations():
    load, strip = load_checkpoint.STAGE, strip_optimizer.STAGE
    assert (load.takes, load.inputs, load.makes) == ((), "none", "torch")
    assert (strip.takes, strip.inputs, strip.makes) == (("torch",), "one", "torch")


def test_params_refuse_unknown_keys():
    with pytest.raises(ValueError):
        load_checkpoint.Params.model_validate({"allow_pickles": True})
    with pytest.raises(ValueError):
        strip_optimizer.Params.model_validate({"dtype": "keep"})


def test_strip_optimizer(tmp_path, source_model):
    path = tmp_path / "epoch7.ckpt"
    torch.save(training_dict(source_model), path)
    loaded = load(tmp_path, path).product
    ctx = make_context(tmp_path, path, name="slim")
    output = strip_optimizer.run(ctx, {"input": loaded}, strip_optimizer.Params())
    state_dict = torch.load(output.product.path, map_location="cpu", weights_only=True)
    assert set(state_dict) == set(source_model.state_dict())
    assert output.product.path.parent == ctx.workdir
    metrics = output.metrics
    assert metrics["bytes_before"] == path.stat().st_size
    assert metrics["bytes_after"] == output.product.path.stat().st_size < metrics["bytes_before"]
    assert 0 < metrics["saved_fraction"] < 1
    assert_same_outputs(output, source_model)


def test_strip_optimizer_refuses_a_changed_architecture(tmp_path):
    torch.manual_seed(0)
    narrow = save_torch_module(digits_cnn(width=16).eval(), tmp_path)
    ctx = make_context(tmp_path, None, name="slim")
    with pytest.raises(StageError, match="right after load_checkpoint"):
        strip_optimizer.run(ctx, {"input": narrow}, strip_optimizer.Params())
