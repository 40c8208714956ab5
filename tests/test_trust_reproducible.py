"""Trust and reproducibility: a run loads exactly the checkpoint bytes it hashed, nightly passes over files
still being written, a pipe is not a checkpoint, and the same cache key makes the same artifact bytes in
any process (static INT8, QAT, prune with fine-tuning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.cli import main
from pipeline.errors import CheckpointError
from pipeline.nightly import checkpoints as nightly_checkpoints
from pipeline.nightly.checkpoints import newest_checkpoint
from pipeline.recipe import load_recipe
from pipeline.records.files import sha256_file
from pipeline.records.store import ArtifactStore
from pipeline.run.engine import check_checkpoint_file, in_threads, run_plan
from pipeline.zoo import digits_cnn
from tests.conftest import REPO_ROOT

LOAD_ONLY = """
name: trust
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
"""

# Data whose train loader shuffles with torch's global generator, as many user factories do: what the
# stages train and calibrate on then depends on the process's random state unless the executor seeds it.
REPRODUCIBLE = """
name: reproducible
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
data: {factory: "tests.test_trust_reproducible:digits_shuffled_by_the_global_generator"}
stages:
  load:   {uses: load_checkpoint}
  static: {uses: quantize, needs: [load], with: {mode: static, calibration_batches: 4}}
  qat:    {uses: quantize, needs: [load], with: {mode: qat, epochs: 1}}
  prune:  {uses: prune, needs: [load], with: {method: magnitude, amount: 0.3, finetune: {epochs: 1}}}
"""

# One fresh process: first a history of its own (hooks registered and numbers drawn, as earlier stages
# or another run would leave), then the recipe; prints each stage's key, artifact digest and file sha256.
BUILD_IN_A_FRESH_PROCESS = """
import json, random, sys
import numpy, torch
torch.set_num_threads(1)
history = int(sys.argv[4])
scratch = torch.nn.Linear(1, 1)
for _ in range(history):
    scratch.register_forward_hook(lambda *args: None)
torch.rand(history); numpy.random.rand(history); [random.random() for _ in range(history)]
from pipeline.recipe import load_recipe
from pipeline.records.store import ArtifactStore
from pipeline.records.files import sha256_file
from pipeline.run.engine import run_plan
store = ArtifactStore(sys.argv[2])
record = run_plan(load_recipe(sys.argv[1]), store, sys.argv[3])
built = {}
for stage in record["stages"]:
    artifact = store.read(stage["key"])
    built[stage["name"]] = {"state": stage["state"], "key": stage["key"], "digest": artifact.digest,
                            "file_sha256": sha256_file(artifact.model_path), "metrics": stage["metrics"]}
print(json.dumps(built))
"""


def digits_shuffled_by_the_global_generator(batch_size: int = 64):
    """The digits split, its train loader shuffled by torch's global generator (no generator of its own)."""
    from pipeline.torchkit.data import digits

    train, evaluation = digits(batch_size=batch_size)
    return DataLoader(train.dataset, batch_size=batch_size, shuffle=True), evaluation


def save_checkpoint(path: Path, seed: int) -> Path:
    """A digits_cnn training checkpoint with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    torch.save({"model_state_dict": digits_cnn().state_dict(), "epoch": seed}, path)
    return path


def load_digest(store: ArtifactStore, record: dict) -> str:
    """The content digest of the load stage's artifact in ``record``."""
    (load,) = [stage for stage in record["stages"] if stage["name"] == "load"]
    assert load["state"] == "done", load
    return store.read(load["key"]).digest


def test_a_checkpoint_rewritten_after_hashing_loads_the_bytes_that_were_hashed(tmp_path, write_recipe):
    plan = load_recipe(write_recipe(LOAD_ONLY))
    checkpoint = save_checkpoint(tmp_path / "last.ckpt", seed=1)
    original_sha256 = sha256_file(checkpoint)
    clean_store = ArtifactStore(tmp_path / "clean")
    clean_digest = load_digest(clean_store, run_plan(plan, clean_store, checkpoint))

    submit_in_thread, close = in_threads()
    loaded_from = []

    def trainer_rewrites_then_submit(call):
        """Lightning saving its next epoch into the same file, after run_plan hashed it, before the load runs."""
        save_checkpoint(checkpoint, seed=2)
        loaded_from.append(raced_store.checkpoint_file(call.checkpoint_path))  # the snapshot, by its path inside the store
        return submit_in_thread(call)

    raced_store = ArtifactStore(tmp_path / "raced")
    try:
        record = run_plan(plan, raced_store, checkpoint, submit=trainer_rewrites_then_submit)
    finally:
        close()
    raced_digest = load_digest(raced_store, record)
    print(f"\nload artifact digest: clean run {clean_digest}, checkpoint rewritten before the load {raced_digest}")
    assert sha256_file(checkpoint) != original_sha256  # the user's file did change
    assert raced_digest == clean_digest
    assert record["checkpoint"] == {"path": str(checkpoint), "sha256": original_sha256}
    assert loaded_from == [raced_store.root / "checkpoints" / original_sha256 / "last.ckpt"]
    assert sha256_file(loaded_from[0]) == original_sha256


def test_a_snapshot_already_in_the_store_is_reused_and_a_damaged_one_replaced(tmp_path, write_recipe):
    plan = load_recipe(write_recipe(LOAD_ONLY))
    checkpoint = save_checkpoint(tmp_path / "model.pt", seed=1)
    store = ArtifactStore(tmp_path / "store")
    first = run_plan(plan, store, checkpoint)
    snapshot = store.root / "checkpoints" / first["checkpoint"]["sha256"] / "model.pt"
    snapshot.chmod(0o644)
    snapshot.write_bytes(b"damaged")
    second = run_plan(plan, store, checkpoint)
    assert [stage["state"] for stage in second["stages"]] == ["cached"]
    assert sha256_file(snapshot) == first["checkpoint"]["sha256"]
    assert not list(store.tmp_dir.iterdir())  # no temporary copy left behind


def test_a_fifo_or_a_device_is_not_a_regular_file_in_one_line_and_is_never_opened(tmp_path, capsys):
    fifo = tmp_path / "checkpoint.pt"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(max_workers=1) as pool:  # opening the FIFO would block: a hang fails here instead
        code = pool.submit(main, ["run", str(REPO_ROOT / "recipes" / "demo.yaml"), "--checkpoint", str(fifo),
                                  "--store", str(tmp_path / "s")]).result(timeout=60)
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: checkpoint {fifo} is not a regular file (a FIFO); give the checkpoint file itself"
    with pytest.raises(CheckpointError, match=r"^checkpoint /dev/zero is not a regular file \(a character device\)"):
        check_checkpoint_file(Path("/dev/zero"))


def keep_appending(path: Path, stop: threading.Event) -> None:
    """A trainer still writing ``path``: a few bytes more every 20 ms until ``stop`` is set."""
    while not stop.is_set():
        with open(path, "ab") as handle:
            handle.write(b"\0" * 1024)
        time.sleep(0.02)


def test_nightly_passes_over_a_checkpoint_still_being_written_for_the_newest_complete_one(tmp_path):
    save_checkpoint(tmp_path / "epoch-1.pt", seed=1)
    save_checkpoint(tmp_path / "epoch-2.pt", seed=2)
    stop = threading.Event()
    writer = threading.Thread(target=keep_appending, args=(tmp_path / "epoch-2.pt", stop))
    writer.start()
    try:
        choice = newest_checkpoint(str(tmp_path), settle_seconds=0.3)
    finally:
        stop.set()
        writer.join()
    assert choice.path.name == "epoch-1.pt"
    assert choice.passed_over == ("passed over epoch-2.pt (still being written: size or modification time changed within 0.3 s)",)
    assert choice.reason.startswith("highest epoch 1 of 1 checkpoints; passed over epoch-2.pt (still being written")


def test_an_unreadable_newest_checkpoint_does_not_fail_the_night_while_an_older_one_is_good(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "epoch-1.pt", seed=1)
    save_checkpoint(tmp_path / "epoch-2.pt", seed=2)
    readable = nightly_checkpoints.first_byte_readable  # tests run as root here, so chmod cannot make a file unreadable
    monkeypatch.setattr(nightly_checkpoints, "first_byte_readable",
                        lambda path: "Permission denied" if path.name == "epoch-2.pt" else readable(path))
    choice = newest_checkpoint(str(tmp_path), settle_seconds=0.01)
    assert choice.path.name == "epoch-1.pt"
    assert choice.passed_over == ("passed over epoch-2.pt (unreadable: Permission denied)",)


def build_in_fresh_processes(recipe: Path, checkpoint: Path, stores_and_histories: dict[Path, int]) -> list[dict]:
    """Run ``recipe`` in one new Python process per store, each with its ``history`` of hooks and random draws
    first, side by side (so an edit to project code elsewhere is unlikely to fall between them); what each built."""
    processes = [
        subprocess.Popen([sys.executable, "-c", BUILD_IN_A_FRESH_PROCESS, str(recipe), str(store), str(checkpoint), str(history)],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OPTIPIPE_QUIET": "1"})
        for store, history in stores_and_histories.items()
    ]
    built = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        built.append(json.loads(stdout.strip().splitlines()[-1]))
    return built


def test_the_same_cache_key_gives_the_same_artifact_bytes_in_any_process(tmp_path, write_recipe):
    recipe = write_recipe(REPRODUCIBLE)
    checkpoint = save_checkpoint(tmp_path / "model.pt", seed=3)
    first, resumed = build_in_fresh_processes(recipe, checkpoint, {tmp_path / "first": 0, tmp_path / "resumed": 7})
    for stage in ("static", "qat", "prune"):
        print(f"\n{stage}: key {first[stage]['key'][:16]} file sha256 {first[stage]['file_sha256']} / {resumed[stage]['file_sha256']}")
        assert first[stage]["state"] == resumed[stage]["state"] == "done"
        assert first[stage]["key"] == resumed[stage]["key"]
        assert first[stage]["file_sha256"] == resumed[stage]["file_sha256"]
        assert first[stage]["digest"] == resumed[stage]["digest"]
        assert first[stage]["metrics"] == resumed[stage]["metrics"]


DRAWING_FACTORY = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def loaders():
    inputs = torch.randn(64, 1, 8, 8)  # drawn from torch's global generator
    labels = torch.randint(0, 10, (64,))
    return DataLoader(TensorDataset(inputs, labels), batch_size=16), DataLoader(TensorDataset(inputs, labels), batch_size=16)
'''


def test_a_data_factory_drawing_from_the_global_generator_gets_the_same_data_whatever_ran_before(tmp_path, monkeypatch):
    import torch

    from pipeline.recipe import load_recipe
    from pipeline.run.executor import data_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "drawing_data.py").write_text(DRAWING_FACTORY)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\nmodel: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}\n"
                      "data: {factory: 'drawing_data:loaders'}\nstages:\n  load: {uses: load_checkpoint}\n")
    plan = load_recipe(recipe)
    torch.manual_seed(1)
    first = data_of(plan, "run-1").eval_set.inputs["input"]
    torch.manual_seed(2)
    before = torch.random.get_rng_state()
    bundle = data_of(plan, "run-2")
    assert torch.equal(torch.random.get_rng_state(), before), "building the data must not move the caller's generator"
    assert (first == bundle.eval_set.inputs["input"]).all()
