"""A catalogue of bad inputs for the ``optipipe`` CLI: each one must end in one clear ``error:`` line, exit 2.

Every entry writes its bad files under a temporary folder (nothing binary is checked in) and returns the
argv for ``pipeline.cli.main``. ``expect`` is a substring of the one-line message optipipe must print.
Used by ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HEADER = """name: bad
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
"""
LOAD_ONLY = HEADER + "  load: {uses: load_checkpoint}\n"
LOAD_AND_CHECK = HEADER + "  load: {uses: load_checkpoint}\n  check: {uses: validate, needs: [load]}\n"


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``make(tmp)`` creates its files under ``tmp`` and returns the CLI argv."""

    id: str
    make: Callable[[Path], list[str]]
    expect: str


# --- helpers -------------------------------------------------------------------------------------------


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run_argv(tmp: Path, recipe: Path, checkpoint: Path) -> list[str]:
    return ["run", str(recipe), "--checkpoint", str(checkpoint), "--store", str(tmp / "store")]


def good_checkpoint(tmp: Path, name: str = "good.pt") -> Path:
    """An (untrained) digits_cnn checkpoint in the common training format: cheap and valid."""
    import torch

    from pipeline.zoo import digits_cnn

    torch.manual_seed(0)
    path = tmp / name
    torch.save({"model_state_dict": digits_cnn().state_dict(), "epoch": 1}, path)
    return path


def checkpoint_case(write_checkpoint: Callable[[Path], Path], recipe_text: str = LOAD_ONLY) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        return run_argv(tmp, write(tmp, "recipe.yaml", recipe_text), write_checkpoint(tmp))

    return make


def validate_case(recipe_text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        return ["validate", str(write(tmp, "recipe.yaml", recipe_text))]

    return make


def run_recipe_case(recipe_text: str, files: dict[str, str] | None = None) -> Callable[[Path], list[str]]:
    """A run of ``recipe_text`` (user modules in ``files`` written next to it) on a valid digits_cnn checkpoint."""

    def make(tmp: Path) -> list[str]:
        for name, text in (files or {}).items():
            write(tmp, name, text)
        return run_argv(tmp, write(tmp, "recipe.yaml", recipe_text), good_checkpoint(tmp))

    return make


# --- checkpoints ---------------------------------------------------------------------------------------


def ckpt_missing(tmp: Path) -> Path:
    return tmp / "does-not-exist.pt"


def ckpt_empty(tmp: Path) -> Path:
    path = tmp / "empty.pt"
    path.write_bytes(b"")
    return path


def ckpt_truncated_zip(tmp: Path) -> Path:
    full = good_checkpoint(tmp, "full.pt")
    data = full.read_bytes()
    path = tmp / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def ckpt_random_bytes(tmp: Path) -> Path:
    import random

    path = tmp / "random.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def ckpt_onnx_file(tmp: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def ckpt_text_file(tmp: Path) -> Path:
    return write(tmp, "notes.pt", "these are not weights\njust some text\n")


def ckpt_folder(tmp: Path) -> Path:
    path = tmp / "ckpt-folder"
    path.mkdir()
    return path


def ckpt_other_architecture(tmp: Path) -> Path:
    import torch

    from pipeline.zoo import mlp

    path = tmp / "mlp.pt"
    torch.save(mlp().state_dict(), path)
    return path


def ckpt_mis_shaped(tmp: Path) -> Path:
    import torch

    from pipeline.zoo import digits_cnn

    path = tmp / "wide16.pt"
    torch.save({"model_state_dict": digits_cnn(width=16).state_dict()}, path)
    return path


def ckpt_nan_weights(tmp: Path) -> Path:
    import torch

    from pipeline.zoo import digits_cnn

    state = digits_cnn().state_dict()
    first_float = next(name for name, tensor in state.items() if tensor.is_floating_point())
    state[first_float] = state[first_float].clone().fill_(float("nan"))
    path = tmp / "nan.pt"
    torch.save(state, path)
    return path


def ckpt_pickled_module(tmp: Path) -> Path:
    import torch

    from pipeline.zoo import digits_cnn

    path = tmp / "whole-module.pt"
    torch.save(digits_cnn(), path)
    return path


def ckpt_list_of_tensors(tmp: Path) -> Path:
    import torch

    path = tmp / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], path)
    return path


# --- store ---------------------------------------------------------------------------------------------


def store_under_a_file(tmp: Path) -> list[str]:
    (tmp / "plain-file").write_text("not a folder")
    recipe = write(tmp, "recipe.yaml", LOAD_ONLY)
    return ["run", str(recipe), "--checkpoint", str(good_checkpoint(tmp)), "--store", str(tmp / "plain-file" / "store")]


# --- user modules (unique module names: sys.modules is shared by every entry in the process) ------------

FACTORY_RAISES = {
    "bad_factory_raises.py": """
        import torch.nn as nn

        def build(**kwargs):
            raise ValueError("width must be a multiple of 8")
    """,
}

DATA_HEADER = """name: bad
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
data: {factory: %s:loaders}
stages:
  load: {uses: load_checkpoint}
  check: {uses: validate, needs: [load]}
"""


def data_module(inputs: str, labels: str) -> str:
    return f"""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def loaders():
            inputs, labels = {inputs}, {labels}
            dataset = TensorDataset(inputs, labels)
            return DataLoader(dataset, batch_size=16), DataLoader(dataset, batch_size=16)
    """


DATA_WRONG_SHAPE = {"bad_data_shape.py": data_module("torch.randn(32, 3, 5, 5)", "torch.arange(32) % 10")}
DATA_EMPTY = {"bad_data_empty.py": data_module("torch.zeros(0, 1, 8, 8)", "torch.zeros(0, dtype=torch.long)")}
DATA_LABELS_OUT_OF_RANGE = {"bad_data_labels.py": data_module("torch.randn(32, 1, 8, 8)", "torch.full((32,), 50)")}
DATA_FACTORY_RAISES = {
    "bad_data_raises.py": """
        def loaders():
            raise FileNotFoundError("/data/imagenet/train not found")
    """,
}


def runtime_export_fails(tmp: Path) -> list[str]:
    """A user model whose forward branches on a tensor value: torch.onnx.export (dynamo) cannot export it."""
    import importlib.util

    import torch

    source = write(tmp, "bad_dynamic_model.py", """
        import torch
        import torch.nn as nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)

            def forward(self, x):
                x = x.flatten(1)
                if x.sum() > 0:
                    return self.fc(x)
                return -self.fc(x)

        def build():
            return Branchy()
    """)
    spec = importlib.util.spec_from_file_location("_bad_dynamic_model_for_ckpt", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoint = tmp / "branchy.pt"
    torch.save(module.build().state_dict(), checkpoint)
    recipe = write(tmp, "recipe.yaml", """
        name: bad
        model: {factory: bad_dynamic_model:build, input_shape: [1, 1, 8, 8]}
        stages:
          load: {uses: load_checkpoint}
          onnx: {uses: export_onnx, needs: [load], with: {simplify: false}}
    """)
    return run_argv(tmp, recipe, checkpoint)


# --- the catalogue -------------------------------------------------------------------------------------

CATALOGUE: list[BadInput] = [
    # checkpoints
    BadInput("ckpt-missing", checkpoint_case(ckpt_missing), "checkpoint not found"),
    BadInput("ckpt-folder", checkpoint_case(ckpt_folder), "is a folder without config.json; give the checkpoint file, or a save_pretrained folder"),
    BadInput("ckpt-empty", checkpoint_case(ckpt_empty), "empty"),
    BadInput("ckpt-truncated-zip", checkpoint_case(ckpt_truncated_zip), "truncated.pt"),
    BadInput("ckpt-random-bytes", checkpoint_case(ckpt_random_bytes), "random.pt"),
    BadInput("ckpt-onnx-file", checkpoint_case(ckpt_onnx_file), "onnx"),
    BadInput("ckpt-text-file", checkpoint_case(ckpt_text_file), "notes.pt"),
    BadInput("ckpt-other-architecture", checkpoint_case(ckpt_other_architecture), "pipeline.zoo:digits_cnn"),
    BadInput("ckpt-mis-shaped", checkpoint_case(ckpt_mis_shaped), "mis-shaped"),
    BadInput("ckpt-nan-weights", checkpoint_case(ckpt_nan_weights), "NaN"),
    BadInput("ckpt-pickle-needs-code", checkpoint_case(ckpt_pickled_module), "allow_pickle"),
    BadInput("ckpt-list-of-tensors", checkpoint_case(ckpt_list_of_tensors), "list"),
    # recipes
    BadInput("recipe-missing", lambda tmp: ["validate", str(tmp / "nope.yaml")], "recipe file not found"),
    BadInput("recipe-empty-file", validate_case(""), "empty"),
    BadInput("recipe-yaml-syntax", validate_case(HEADER + "  load: {uses: load_checkpoint\n  x: [\n"), "YAML syntax error"),
    BadInput("recipe-wrong-type", validate_case(HEADER.replace("stages:", "data: {batch_size: many}\nstages:") + "  load: {uses: load_checkpoint}\n"), "data.batch_size"),
    BadInput("recipe-top-level-list", validate_case("- name: bad\n- stages: {}\n"), "recipe.yaml"),
    BadInput("recipe-unknown-key", validate_case("nme: x\n" + LOAD_ONLY), "unknown key 'nme'"),
    BadInput("recipe-unknown-stage", validate_case(HEADER + "  load: {uses: load_chekpoint}\n"), "did you mean 'load_checkpoint'"),
    BadInput("recipe-typo-parameter", validate_case(HEADER + "  load: {uses: load_checkpoint, with: {alow_pickle: true}}\n"), "did you mean 'allow_pickle'"),
    BadInput("recipe-cycle", validate_case(LOAD_ONLY + "  a: {uses: fuse_conv_bn, needs: [b]}\n  b: {uses: fuse_conv_bn, needs: [a]}\n"), "cycle in 'needs'"),
    BadInput("recipe-self-dependency", validate_case(LOAD_ONLY + "  a: {uses: fuse_conv_bn, needs: [a]}\n"), "needs itself"),
    BadInput("recipe-unknown-needs", validate_case(LOAD_ONLY + "  a: {uses: fuse_conv_bn, needs: [laod]}\n"), "needs unknown stage 'laod'"),
    BadInput("recipe-kind-mismatch", validate_case(LOAD_ONLY + "  onnx: {uses: export_onnx, needs: [load]}\n  fused: {uses: fuse_conv_bn, needs: [onnx]}\n"), "makes a onnx model"),
    BadInput("recipe-empty-stages", validate_case(HEADER + "  {}\n"), "stages"),
    BadInput("recipe-path-traversal-stage", validate_case(HEADER + '  "../../x": {uses: load_checkpoint}\n'), "letters, digits"),
    BadInput("recipe-two-load-stages", validate_case(LOAD_ONLY + "  load2: {uses: load_checkpoint}\n"), "exactly one load_checkpoint"),
    BadInput("recipe-bad-override", lambda tmp: ["validate", str(write(tmp, "recipe.yaml", LOAD_ONLY)), "--set", "laod.strict=false"], "no stage 'laod'"),
    BadInput("recipe-bad-checkpoint-run", checkpoint_case(ckpt_missing, HEADER + "  load: {uses: load_chekpoint}\n"), "did you mean 'load_checkpoint'"),
    # models and data
    BadInput("model-factory-module-missing", validate_case(LOAD_ONLY.replace("pipeline.zoo:digits_cnn", "no_such_models:build")), "no_such_models"),
    BadInput("model-factory-callable-missing", validate_case(LOAD_ONLY.replace("digits_cnn", "digits_cnnn")), "digits_cnnn"),
    BadInput("model-factory-raises", run_recipe_case(LOAD_ONLY.replace("pipeline.zoo:digits_cnn", "bad_factory_raises:build"), FACTORY_RAISES), "width must be a multiple of 8"),
    BadInput("data-factory-raises", run_recipe_case(DATA_HEADER % "bad_data_raises", DATA_FACTORY_RAISES), "/data/imagenet/train not found"),
    BadInput("data-wrong-shape", run_recipe_case(DATA_HEADER % "bad_data_shape", DATA_WRONG_SHAPE), "the input is shaped [32, 3, 5, 5] but model.input_shape fixes dimension 1 to 1"),
    BadInput("data-empty", run_recipe_case(DATA_HEADER % "bad_data_empty", DATA_EMPTY), "no batches"),
    BadInput("data-labels-out-of-range", run_recipe_case(DATA_HEADER % "bad_data_labels", DATA_LABELS_OUT_OF_RANGE), "eval labels range from"),
    BadInput("data-bad-kwargs", run_recipe_case(LOAD_AND_CHECK.replace("stages:", "data: {source: synthetic, kwargs: {num_sampels: 8}}\nstages:")), "num_sampels"),
    # runtime
    BadInput("runtime-export-fails", runtime_export_fails, "onnx"),
    BadInput("store-under-a-file", store_under_a_file, "plain-file"),
]
