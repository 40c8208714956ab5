"""Shared fixtures: one Prefect test server per session, a trained demo checkpoint, recipe files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["OPTIPIPE_QUIET"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent

# Prefect's console log handler can keep a stream that an earlier test's capture closed; its failed writes
# then show up in a later test's stderr as "--- Logging error ---" blocks ending with an "Arguments:" line.
PREFECT_LOGGING_ERROR = re.compile(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", re.DOTALL)


def optipipe_stderr(stderr: str) -> str:
    """Captured stderr without Prefect's own logging-error blocks, so assertions read optipipe's output."""
    return PREFECT_LOGGING_ERROR.sub("", stderr)


DIGITS_INPUT_SHAPE = [1, 1, 8, 8]


def one_stage_recipe(factory: str = "pipeline.zoo:digits_cnn", input_shape: list[int] = DIGITS_INPUT_SHAPE):
    """The smallest valid recipe around a model factory: what a stage tested on its own needs as ``ctx.recipe``."""
    from pipeline.recipe import Recipe

    return Recipe.model_validate({
        "name": "t",
        "model": {"factory": factory, "input_shape": list(input_shape)},
        "stages": {"load": {"uses": "load_checkpoint"}},
    })


def as_input(model, folder: Path):
    """``model`` saved as an upstream stage would have saved it, in a fresh folder under ``folder``."""
    import tempfile

    from pipeline.torchkit.handles import save_torch_module

    return save_torch_module(model.eval(), Path(tempfile.mkdtemp(dir=folder)))


def run_without_prefect(recipe_path: Path, checkpoint: Path, store_root: Path, overrides=()) -> dict:
    """Run a recipe's stages one after another with ``run_plan`` (no Prefect) and return the run record."""
    from pipeline.recipe import load_recipe
    from pipeline.records.store import ArtifactStore
    from pipeline.run.engine import run_plan

    return run_plan(load_recipe(recipe_path, list(overrides)), ArtifactStore(store_root), checkpoint, overrides=list(overrides))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module that trains: on a busy 2-core machine two spin-waiting
    threads made small training loops 5-60x slower. The previous count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_data():
    """scikit-learn digits as the default recipe builds them, built anew (fresh shuffling)."""
    from pipeline.torchkit.data import build_data
    from pipeline.torchkit.model_io import ModelIO

    recipe = one_stage_recipe()
    return build_data(recipe.data, ModelIO.of(recipe.model))


@pytest.fixture(scope="session")
def data():
    """scikit-learn digits as the default recipe builds them, shared by every stage test."""
    return digits_data()


@pytest.fixture
def context(tmp_path: Path, data):
    """A factory of StageContexts on the digits recipe, each with a fresh, empty workdir."""
    from pipeline.run.contract import StageContext

    def make(name: str, **overrides) -> StageContext:
        workdir = tmp_path / f"work-{name}"
        workdir.mkdir()
        fields = {"recipe": one_stage_recipe(), "checkpoint_path": None, "load_data": lambda: data} | overrides
        return StageContext(name=name, workdir=workdir, **fields)

    return make


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server (SQLite in a temporary PREFECT_HOME) for every flow test."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo baseline (digits_cnn) trained briefly and saved in the common training format."""
    from pipeline.torchkit.demo_baseline import train_demo_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "digits_cnn.pt"
    train_demo_checkpoint(path, epochs=8)
    return path


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write recipe text to a file in the test's folder and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
