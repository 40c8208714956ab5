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
    from pipeline.demo import train_demo_checkpoint

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
