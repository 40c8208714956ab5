"""Checkpoints as people save them: weights under any training-dict key, wrapper prefixes, EMA entries, and
Hugging Face ``save_pretrained`` folders (snapshotted file by file, read by optipipe's own safe readers)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.recipe import Recipe
from pipeline.records.store import ArtifactStore
from pipeline.run.checkpoint_snapshot import snapshot_checkpoint
from pipeline.run.engine import check_checkpoint_file
from stages import load_checkpoint
from tests.conftest import run_without_prefect
from tests.test_load_checkpoint import assert_same_outputs, load, make_context

transformers = pytest.importorskip("transformers")

BERT_MODEL = """model:
  factory: pipeline.hf:auto_model
  kwargs: {auto_class: AutoModelForSequenceClassification}
  inputs:
    - {name: input_ids, shape: [batch, seq], dtype: int64, vocab_size: 50}
    - {name: attention_mask, shape: [batch, seq], dtype: int64, range: [0, 2]}
"""
DIGITS_MODEL = "model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}\n"


def load_only_recipe(model: str) -> str:
    return f"name: layouts\n{model}stages:\n  load: {{uses: load_checkpoint}}\n"


@pytest.fixture
def source_model() -> torch.nn.Module:
    from pipeline.zoo import digits_cnn

    torch.manual_seed(0)
    return digits_cnn().eval()


def prefixed(state_dict: dict, prefix: str) -> dict:
    return {prefix + name: tensor for name, tensor in state_dict.items()}


def shifted(state_dict: dict) -> dict:
    """Other weights of the same shapes: what an EMA copy is."""
    return {name: tensor + 0.5 if tensor.is_floating_point() else tensor.clone() for name, tensor in state_dict.items()}


def test_pytorch_cifar_layout_loads(tmp_path, source_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"net": source_model.state_dict(), "acc": 93.1, "epoch": 200}, path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    metrics = output.metrics
    assert metrics["state_dict_key"] == "net" and metrics["prefix_stripped"] is None
    assert metrics["extra_entries"] == ["acc", "epoch"] and metrics["epoch"] == 200


@pytest.mark.parametrize("prefix", ["net.", "backbone.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, source_model, prefix):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": prefixed(source_model.state_dict(), prefix), "optimizer_states": []}, path)
    output = load(tmp_path, path)
    assert_same_outputs(output, source_model)
    assert output.metrics["prefix_stripped"] == prefix and output.metrics["state_dict_key"] == "state_dict"


def test_explicit_strip_prefix(tmp_path, source_model):
    weights = prefixed(source_model.state_dict(), "net.")
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": weights}, path)
    assert load(tmp_path, path, strip_prefix="net.").metrics["prefix_stripped"] == "net."
    with pytest.raises(CheckpointError, match="no tensor name starts with strip_prefix 'student.'.*starts with 'net.'"):
        load(tmp_path, path, strip_prefix="student.")


def test_several_weight_entries(tmp_path, source_model):
    weights, ema = source_model.state_dict(), shifted(source_model.state_dict())
    unnamed = tmp_path / "two.pt"
    torch.save({"student": weights, "ema": ema}, unnamed)
    with pytest.raises(CheckpointError, match=r"several entries \('student', 'ema'\).*state_dict_key"):
        load(tmp_path, unnamed)
    path = tmp_path / "timm.pt"
    torch.save({"model": weights, "model_ema": ema, "epoch": 3}, path)
    assert load(tmp_path, path).metrics["state_dict_key"] == "model"  # the known key is preferred
    output = load(tmp_path, path, state_dict_key="model_ema")
    assert output.metrics["state_dict_key"] == "model_ema" and output.metrics["extra_entries"] == ["epoch", "model"]
    loaded = output.product.load().state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in ema.items())
    with pytest.raises(CheckpointError, match="no weights under state_dict_key 'ema'.*'model', 'model_ema'"):
        load(tmp_path, path, state_dict_key="ema")


def test_ema_selected_by_key(tmp_path, source_model):
    ema = shifted(source_model.state_dict())
    path = tmp_path / "ema.pt"
    torch.save({"model": source_model.state_dict(), "ema": ema}, path)
    loaded = load(tmp_path, path, state_dict_key="ema").product.load().state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in ema.items())


def test_mismatch_names_the_prefix_not_strict_false(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"net": {"net.encoder.weight": torch.zeros(3, 3), "net.encoder.bias": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError) as caught:
        load(tmp_path, path)
    message = str(caught.value)
    assert "does not fit" in message and "none of its 2 tensors fits" in message and "\n" not in message
    assert "starts with 'net.'" in message and 'strip_prefix: "net."' in message and "strict: false" not in message


def test_dataparallel_under_net_runs(tmp_path, write_recipe, source_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"net": prefixed(source_model.state_dict(), "module."), "acc": 90.0, "epoch": 5}, path)
    record = run_without_prefect(write_recipe(load_only_recipe(DIGITS_MODEL)), path, tmp_path / "store")
    assert record["state"] == "succeeded", record.get("message")
    (entry,) = record["stages"]
    assert entry["metrics"]["state_dict_key"] == "net" and entry["metrics"]["prefix_stripped"] == "module."


# --- Hugging Face save_pretrained folders ------------------------------------------------------------------


@pytest.fixture
def bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def bert_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_pretrained_folder_runs(tmp_path, write_recipe, bert, shard_size):
    folder = tmp_path / "bert-tiny"
    bert.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    record = run_without_prefect(write_recipe(load_only_recipe(BERT_MODEL)), folder, tmp_path / "store")
    assert record["state"] == "succeeded", record.get("message")
    (entry,) = record["stages"]
    metrics = entry["metrics"]
    assert metrics["format"] == "huggingface" and metrics["missing_keys"] == [] and metrics["unexpected_keys"] == []
    assert (metrics["shards"] > 1) == bool(shard_size)
    loaded = torch.load(os.path.join(entry["artifact"], "model.pt"), weights_only=False)
    assert torch.equal(bert_logits(loaded.eval()), bert_logits(bert))


def bert_recipe() -> Recipe:
    import yaml

    return Recipe.model_validate(yaml.safe_load(load_only_recipe(BERT_MODEL)))


def load_folder(tmp_path, folder):
    return load_checkpoint.run(make_context(tmp_path, folder, recipe=bert_recipe()), {}, load_checkpoint.Params())


def test_tied_weights_missing_from_the_folder(tmp_path, bert):
    masked = transformers.BertForMaskedLM(bert.config).eval()
    folder = tmp_path / "mlm"
    masked.save_pretrained(folder)
    recipe = bert_recipe().model_copy(deep=True)
    recipe.model.kwargs = {"auto_class": "AutoModelForMaskedLM"}
    output = load_checkpoint.run(make_context(tmp_path, folder, recipe=recipe), {}, load_checkpoint.Params())
    assert output.metrics["missing_keys"] == [] and "cls.predictions.decoder.weight" in output.metrics["tied_keys"]
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(output.product.load()(input_ids=ids).logits, masked(input_ids=ids).logits)


def test_pytorch_model_bin_folder(tmp_path, bert):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(bert.config.to_json_string())
    torch.save(bert.state_dict(), folder / "pytorch_model.bin")
    output = load_folder(tmp_path, folder)
    assert output.metrics["shards"] == 1 and torch.equal(bert_logits(output.product.load()), bert_logits(bert))


def test_remote_code_config_is_refused(tmp_path, bert):
    folder = tmp_path / "remote"
    bert.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    with pytest.raises(CheckpointError, match="custom model code.*never runs code from a checkpoint"):
        load_folder(tmp_path, folder)


def test_file_checkpoint_with_a_folder_factory(tmp_path, bert):
    path = tmp_path / "weights.pt"
    torch.save(bert.state_dict(), path)
    with pytest.raises(CheckpointError, match="needs a save_pretrained folder"):
        load_folder(tmp_path, path)


def test_folder_checks(tmp_path, bert):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is a folder without config.json; give the checkpoint file, or a save_pretrained folder"):
        check_checkpoint_file(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="folder without weights"):
        check_checkpoint_file(empty)
    folder = tmp_path / "bert"
    bert.save_pretrained(folder, max_shard_size="20KB")
    check_checkpoint_file(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside its folder"):
        check_checkpoint_file(folder)


def test_symlink_inside_the_folder_is_refused(tmp_path, bert):
    folder = tmp_path / "linked"
    bert.save_pretrained(folder)
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="symbolic link"):
        snapshot_checkpoint(ArtifactStore(tmp_path / "store"), folder)
    with pytest.raises(CheckpointError, match="symbolic link"):
        check_checkpoint_file(folder)


def test_folder_snapshot_digest_follows_every_shard(tmp_path, bert):
    folder = tmp_path / "bert"
    bert.save_pretrained(folder, max_shard_size="20KB")
    (folder / "checkpoint-500").mkdir()  # a Trainer's subfolder: not part of the snapshot
    store = ArtifactStore(tmp_path / "store")
    snapshot, digest = snapshot_checkpoint(store, folder)
    assert snapshot.parent.name == digest and snapshot.name == "bert"
    assert sorted(path.name for path in snapshot.iterdir()) == sorted(path.name for path in folder.iterdir() if path.is_file())
    assert not os.access(snapshot / "config.json", os.W_OK) or os.geteuid() == 0
    assert snapshot_checkpoint(store, folder) == (snapshot, digest)  # reused
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    _, changed = snapshot_checkpoint(store, folder)
    assert changed != digest
    assert list(store.tmp_dir.iterdir()) == []  # no copy left behind


def test_auto_model_without_transformers_says_how_to_install(tmp_path, bert, monkeypatch):
    from pipeline.errors import RecipeError

    folder = tmp_path / "bert"
    bert.save_pretrained(folder)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers now fails
    expected = "model.factory pipeline.hf:auto_model needs the transformers package: pip install 'optipipe[hf]'"
    with pytest.raises(RecipeError) as caught:
        load_folder(tmp_path, folder)
    assert str(caught.value) == expected
