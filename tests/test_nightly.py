"""Nightly re-optimization: newest-checkpoint choice, cache hits on an unchanged night, regressions, `latest`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.nightly.checkpoints import NightlyError, newest_checkpoint
from pipeline.nightly.promotion import read_state
from pipeline.records.store import ArtifactStore
from tests.conftest import REPO_ROOT, optipipe_stderr

NIGHTLY_RECIPE = REPO_ROOT / "recipes" / "nightly.yaml"
QUICK_BENCHMARK = ["bench.min_seconds=0.1", "bench.iterations=5"]


def save_training_checkpoint(path: Path, epoch: int | None, mtime: float | None = None) -> Path:
    payload = {"model_state_dict": {"w": torch.zeros(2)}}
    if epoch is not None:
        payload["epoch"] = epoch
    torch.save(payload, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_highest_epoch_wins_over_newer_files(tmp_path):
    save_training_checkpoint(tmp_path / "a.pt", epoch=3, mtime=1_000)
    save_training_checkpoint(tmp_path / "b.pt", epoch=1, mtime=3_000)
    save_training_checkpoint(tmp_path / "c.ckpt", epoch=2, mtime=2_000)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    choice = newest_checkpoint(str(tmp_path))
    assert choice.path.name == "a.pt" and "highest epoch 3 of 3 checkpoints" in choice.reason


def test_global_step_and_glob(tmp_path):
    torch.save({"global_step": 900, "epoch": 1}, tmp_path / "x-1.pt")
    torch.save({"global_step": 1200, "epoch": 1}, tmp_path / "x-2.pt")
    torch.save({"global_step": 5000}, tmp_path / "other.pt")
    choice = newest_checkpoint(str(tmp_path / "x-*.pt"))
    assert choice.path.name == "x-2.pt" and "global_step 1200" in choice.reason


def test_tie_on_epoch_goes_to_newest_file_and_says_so(tmp_path):
    save_training_checkpoint(tmp_path / "a.pt", epoch=5, mtime=2_000)
    save_training_checkpoint(tmp_path / "b.pt", epoch=5, mtime=1_000)
    choice = newest_checkpoint(str(tmp_path))
    assert choice.path.name == "a.pt" and "tie between b.pt, a.pt" in choice.reason


def test_modification_time_when_a_file_records_no_epoch(tmp_path):
    save_training_checkpoint(tmp_path / "a.pt", epoch=9, mtime=1_000)
    save_training_checkpoint(tmp_path / "b.pt", epoch=None, mtime=2_000)
    choice = newest_checkpoint(str(tmp_path))
    assert choice.path.name == "b.pt" and "modification time" in choice.reason


def test_empty_folder_and_missing_source_are_clear(tmp_path):
    with pytest.raises(NightlyError, match="no checkpoint files in .*looked for .pt"):
        newest_checkpoint(str(tmp_path))
    with pytest.raises(NightlyError, match="neither a folder nor a glob"):
        newest_checkpoint(str(tmp_path / "missing"))


def worse_copy(good: Path, target: Path, epoch: int) -> Path:
    """The same model with noisy conv weights and a higher epoch: the newest, and clearly worse."""
    checkpoint = torch.load(good, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in checkpoint["model_state_dict"].items():
        if name.endswith("weight") and tensor.dim() == 4:
            tensor.add_(0.6 * tensor.std() * torch.randn(tensor.shape, generator=generator))
    checkpoint["epoch"] = epoch
    torch.save(checkpoint, target)
    return target


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_nights_cache_regression_and_promotion(demo_checkpoint, tmp_path, capsys):
    checkpoints, store_root = tmp_path / "checkpoints", tmp_path / "store"
    checkpoints.mkdir()
    shutil.copy(demo_checkpoint, checkpoints / "epoch-08.pt")
    args = ["nightly", str(NIGHTLY_RECIPE), "--checkpoints", str(checkpoints), "--store", str(store_root)]
    for override in QUICK_BENCHMARK:
        args += ["--set", override]

    assert main(args) == 0, optipipe_stderr(capsys.readouterr().err)
    first = read_state(ArtifactStore(store_root), "nightly")
    assert [night["promoted"] for night in first["runs"]] == [True]
    onnx_file = first["latest"]["variants"]["onnx"]
    assert Path(onnx_file).is_file() and onnx_file.endswith("model.onnx")

    assert main(args) == 0, optipipe_stderr(capsys.readouterr().err)
    store = ArtifactStore(store_root)
    second = store.read_run(read_state(store, "nightly")["runs"][-1]["run_id"])
    assert {stage["state"] for stage in second["stages"]} == {"cached"}
    assert second["nightly"]["reference_run"] == first["latest"]["run_id"] and second["nightly"]["regressions"] == []
    capsys.readouterr()

    worse_copy(demo_checkpoint, checkpoints / "epoch-09.pt", epoch=9)
    assert main(args) == 1
    err = optipipe_stderr(capsys.readouterr().err)
    assert "regressions vs run" in err and "top-1 dropped" in err and "fused:" in err and "onnx:" in err
    state = read_state(store, "nightly")
    third = state["runs"][-1]
    assert third["checkpoint"].endswith("epoch-09.pt") and not third["promoted"] and third["regressions"]
    assert state["latest"]["run_id"] == second["run_id"], "a regressed night must not be promoted"
    assert store.read_run(third["run_id"])["nightly"]["regressions"] == third["regressions"]

    assert main(["latest", "nightly", "--variant", "onnx", "--store", str(store_root)]) == 0
    assert capsys.readouterr().out.strip() == state["latest"]["variants"]["onnx"]
    assert main(["latest", str(NIGHTLY_RECIPE), "--variant", "nope", "--store", str(store_root)]) == 2
    assert "--variant 'nope'" in capsys.readouterr().err


def test_latest_before_any_good_night_is_clear(tmp_path, capsys):
    assert main(["latest", "nightly", "--variant", "onnx", "--store", str(tmp_path)]) == 2
    assert "has no promoted nightly result" in capsys.readouterr().err
