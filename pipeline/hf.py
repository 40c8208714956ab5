"""Hugging Face ``save_pretrained`` folders as checkpoints, and ``auto_model``, the factory that builds their architecture.

A folder is a checkpoint when it holds ``config.json`` and the weights: ``model.safetensors``, shards named by
``model.safetensors.index.json``, or ``pytorch_model.bin`` (or its sharded index). This module reads only the
folder's layout and its JSON, each file opened without following links and read up to a size limit; the
weights themselves are read by ``load_checkpoint``'s safe readers (safetensors, weights-only torch.load), never
by ``from_pretrained``. ``auto_model`` builds the architecture from the parsed config with ``transformers`` (an
optional extra, imported only when called): from a config nothing is fetched and no code from the folder runs;
a config naming custom code (``auto_map``) is refused.

Convention: a ``model.factory`` whose signature has a ``checkpoint_config`` parameter is called by
``load_checkpoint`` with the checkpoint folder's parsed ``config.json`` in it.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import CheckpointError, RecipeError

if TYPE_CHECKING:
    from torch import nn

    from pipeline.recipe.schema import ModelSpec

CONFIG_FILE = "config.json"
CONFIG_LIMIT_BYTES = 1 << 20
INDEX_LIMIT_BYTES = 16 << 20  # the index of a model with 100k tensors is a few MiB
WEIGHT_LAYOUTS = (  # (index of shards, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
WEIGHT_NAMES = "model.safetensors, model.safetensors.index.json with its shards, or pytorch_model.bin"
INSTALL_HINT = "model.factory pipeline.hf:auto_model needs the transformers package: pip install 'optipipe[hf]'"


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def read_json(path: Path, limit: int) -> Any:
    """A JSON file of at most ``limit`` bytes, opened without following a link; CheckpointError otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as error:
        reason = "it is a symbolic link" if path.is_symlink() else (error.strerror or str(error))
        raise CheckpointError(f"{path} cannot be read: {reason}; a save_pretrained folder holds regular files") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise CheckpointError(f"{path} is not a regular file; a save_pretrained folder holds regular files")
        text = file.read(limit + 1)
    if len(text) > limit:
        raise CheckpointError(f"{path} is over {limit} bytes: not a config or index that save_pretrained writes")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-save the model with save_pretrained") from None


def refuse_remote_code(config: dict[str, Any], where: str) -> None:
    """Refuse a config naming custom model code (``auto_map``): building it would run code from the checkpoint."""
    if "auto_map" in config:
        classes = ", ".join(sorted(map(str, config["auto_map"]))) if isinstance(config["auto_map"], dict) else "..."
        raise CheckpointError(
            f"{where} names custom model code (auto_map: {classes}), and optipipe never runs code from a checkpoint "
            "(no trust_remote_code); import that model's code in your own model.factory instead")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict, refused when it names custom code."""
    path = folder / CONFIG_FILE
    config = read_json(path, CONFIG_LIMIT_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not the object save_pretrained writes")
    refuse_remote_code(config, str(path))
    return config


def shard_names(index_path: Path) -> list[str]:
    """The shard file names an index's ``weight_map`` names, each a plain file name in the index's folder."""
    weight_map = read_json(index_path, INDEX_LIMIT_BYTES)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(name, str) for name in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map of tensor names to shard files; re-save the model with save_pretrained")
    names = sorted(set(weight_map.values()))
    outside = [name for name in names if Path(name).name != name or name in (".", "..")]
    if outside:
        raise CheckpointError(f"{index_path} names shard {outside[0]!r} outside its folder; shards must be files beside the index")
    return names


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder: its shards in order, or its one weights file."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        if (folder / index_name).exists():
            shards = [folder / name for name in shard_names(folder / index_name)]
            absent = [shard.name for shard in shards if not is_regular_file(shard)]
            if absent:
                raise CheckpointError(f"{folder / index_name} names shard {absent[0]}, which is not a file in {folder}; "
                                      "copy the whole folder save_pretrained wrote")
            return shards
        if (folder / single_name).exists():
            if not is_regular_file(folder / single_name):
                raise CheckpointError(f"{folder / single_name} is a symbolic link or not a regular file; copy the file "
                                      "into the folder instead of linking it")
            return [folder / single_name]
    raise CheckpointError(f"checkpoint {folder} is a folder without weights: expected {WEIGHT_NAMES}")


def check_pretrained_folder(folder: Path) -> None:
    """Raise ``CheckpointError`` unless ``folder`` holds a ``config.json`` and weights, as save_pretrained writes them."""
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(f"checkpoint {folder} is a folder without {CONFIG_FILE}; give the checkpoint file, "
                              "or a save_pretrained folder (config.json and model.safetensors)")
    weight_files(folder)


def takes_checkpoint_config(factory: str) -> bool:
    """Whether the factory's signature has a ``checkpoint_config`` parameter (``auto_model`` has)."""
    from pipeline.imports import resolve_callable

    try:
        return "checkpoint_config" in inspect.signature(resolve_callable(factory, "model.factory")).parameters
    except (TypeError, ValueError):  # a callable without a readable signature
        return False


def factory_kwargs(spec: "ModelSpec", checkpoint: Path | None) -> dict[str, Any]:
    """The keyword arguments ``model.factory`` is called with: ``model.kwargs``, and the checkpoint folder's parsed
    ``config.json`` as ``checkpoint_config`` for a factory that takes it (CheckpointError when the checkpoint is a file)."""
    kwargs = dict(spec.kwargs)
    if takes_checkpoint_config(spec.factory):
        if checkpoint is None or not checkpoint.is_dir():
            raise CheckpointError(f"model.factory {spec.factory} needs a save_pretrained folder (config.json and the weights) "
                                  f"as the checkpoint, and {checkpoint} is a file; give the folder save_pretrained wrote")
        kwargs["checkpoint_config"] = read_config(checkpoint)
    return kwargs


def import_transformers() -> Any:
    """The ``transformers`` package, or a RecipeError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise RecipeError(INSTALL_HINT) from None
    return transformers


def auto_model(checkpoint_config: dict[str, Any], auto_class: str = "AutoModelForSequenceClassification",
               **config_overrides: Any) -> nn.Module:
    """The architecture ``config.json`` describes, with fresh weights: ``transformers.<auto_class>.from_config``.

    ``config_overrides`` (from ``model.kwargs``) replace config entries, e.g. ``num_labels``. load_checkpoint
    then loads the folder's weights into it with its own readers.
    """
    transformers = import_transformers()
    values = {**checkpoint_config, **config_overrides}
    refuse_remote_code(values, "the checkpoint's config.json")
    model_type = values.pop("model_type", None)
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not one transformers "
                              f"{transformers.__version__} knows; upgrade transformers or write your own model.factory")
    auto = getattr(transformers, auto_class, None)
    if not auto_class.startswith("AutoModel") or auto is None:
        raise RecipeError(f"model.kwargs: auto_class {auto_class!r} is not a transformers AutoModel class; "
                          "use e.g. AutoModelForSequenceClassification, AutoModelForTokenClassification or AutoModel")
    config = transformers.CONFIG_MAPPING[model_type](**values)
    return auto.from_config(config, trust_remote_code=False)
