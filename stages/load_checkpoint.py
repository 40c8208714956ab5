"""Source stage: read the user's checkpoint into the architecture that ``model.factory`` builds.

Formats are told apart by content, not suffix: a state_dict (plain or in a training dict), safetensors,
TorchScript, torch.export ``.pt2``, and a whole pickled module, which (like anything else that would run
code from the file: TorchScript, torch.export.load) is loaded only when the recipe sets ``allow_pickle``.
Without it a ``.pt2`` gives only its weights, read without evaluating its graph. Declared sizes are checked
against the bytes the file holds before torch allocates (``max_inflation``); what each format gets is
described in ``pipeline.torchkit.checkpoint_files``.

A training dict's weights are the one top-level entry holding tensors (``{'net': ..., 'acc': 93.1}``), else
``model_state_dict``, ``state_dict`` or ``model``, or the entry ``state_dict_key`` names (``ema``). A prefix
every tensor name shares (``module.``, ``_orig_mod.``, ``net.``, nested ones) is removed when that makes more
names fit the model, or as ``strip_prefix`` says (``pipeline.torchkit.checkpoint_layouts``). A Hugging Face ``save_pretrained`` folder is a checkpoint
too (``pipeline.hf``): its weight files are read like checkpoint files, never by ``from_pretrained``, and a
factory taking ``checkpoint_config`` is given the folder's parsed ``config.json``. Weights the folder leaves
out because they are tied to others it holds (an LM head tied to the embeddings) are filled by loading those.
"""

from __future__ import annotations

import codecs
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from pipeline.errors import CheckpointError, OptipipeError, RecipeError
from pipeline.hf import factory_kwargs, weight_files
from pipeline.recipe import ModelSpec
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage
from pipeline.torchkit.checkpoint_files import (
    TRUST_FIX,
    check_inflation,
    check_legacy_storages,
    check_view_extents,
    check_zip_storages,
    read_pt2_weights,
)
from pipeline.torchkit.checkpoint_layouts import StateDict, Weights, compare_keys, extract_weights, is_tensor_dict, listed, strip_prefix
from pipeline.torchkit.handles import ModelHandle, build_module, save_torch_module


class Params(StageParams):
    allow_pickle: bool = Field(default=False, description="accept files holding pickled Python objects (torch.save(model)); "
                               "loading them runs code from the file: trusted files only")
    strict: bool = Field(default=True, description="checkpoint and model must have the same tensor names and shapes; "
                         "false loads what matches and lists the rest in the metrics")
    max_inflation: float = Field(default=20, gt=1, description="how many times its stored bytes a zip entry, the "
                                 "whole archive or a tensor view may expand to (entries and tensors under 1 MiB "
                                 "exempt); larger is refused as a bomb before anything is allocated")
    state_dict_key: str | None = Field(default=None, description="the entry of a training dict that holds the weights, "
                                       "e.g. ema or model_ema; by default the only entry holding tensors, or else "
                                       "model_state_dict, state_dict or model")
    strip_prefix: str | None = Field(default=None, min_length=1, description="a prefix to remove from the checkpoint's "
                                     "tensor names, e.g. 'net.' for a LightningModule holding self.net; by default a "
                                     "prefix every name shares is removed when that makes more names fit the model")




def not_a_checkpoint(path: Path, reason: str) -> CheckpointError:
    """The error for a file torch cannot read at all."""
    return CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})")


def pickle_refused(path: Path, detail: str) -> CheckpointError:
    """The error for a file whose unpickling needs Python code, when allow_pickle is off."""
    return CheckpointError(
        f"{path} was not loaded: it holds pickled Python objects ({detail}), and loading it would execute code "
        "from the file. Only for a file you trust, set `with: {allow_pickle: true}` on the load stage; "
        "better, re-save just the weights: torch.save(model.state_dict(), path)"
    )


def build_model(spec: ModelSpec, checkpoint: Path | None = None) -> torch.nn.Module:
    """Call the recipe's ``model.factory`` with its kwargs (and the folder's config when it takes
    ``checkpoint_config``); a failing factory is a recipe error, or the optipipe error it raised itself."""
    try:
        return build_module(
            spec.factory,
            factory_kwargs(spec, checkpoint),
            "model.factory",
            raised="{field}: {call} raised {error_type}: {error_text}",
            returned="{field}: {factory} returned a {kind}, not a torch.nn.Module",
        )
    except RecipeError as error:  # a factory's own optipipe error (transformers missing) already says the fix
        if isinstance(error.__cause__, OptipipeError):
            raise error.__cause__ from None
        raise


def unreadable_reason(path: Path, error: Exception) -> str:
    """One short phrase for why torch could not read a file, instead of its traceback."""
    if path.suffix.lower() == ".onnx":
        return "an ONNX model, not PyTorch weights"
    if isinstance(error, EOFError):
        return "it ends before any data: empty or truncated"
    if "zip archive" in str(error):
        return "a damaged zip archive: truncated or corrupted"
    with path.open("rb") as file:
        head = file.read(512)
    try:  # printable UTF-8 is text; a torch pickle starts with 0x80 and a zip with PK\x03\x04
        if all(char.isprintable() or char in "\r\n\t" for char in codecs.getincrementaldecoder("utf-8")().decode(head)):
            return "it is a text file"
    except UnicodeDecodeError:
        pass
    return "its bytes are not a pickle that torch.save writes"


def unsafe_globals(source: Path | bytes, error: Exception | None = None) -> list[str]:
    """Python globals a pickle needs beyond torch's weights-only allowlist (read, never executed)."""
    try:
        checkpoint = io.BytesIO(source) if isinstance(source, bytes) else source
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint))
    except Exception:  # not a zip checkpoint: fall back to the names in torch's refusal
        return re.findall(r"Unsupported global: GLOBAL (\S+)", str(error)) if error else ["<unreadable pickle>"]


def torch_load(path: Path, allow_pickle: bool) -> Any:
    """``torch.load`` on CPU, weights-only unless allowed, every failure turned into a CheckpointError."""
    try:
        with warnings.catch_warnings():  # garbage bytes read as odd pickle protocols; the error below says so
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:  # UnpicklingError, EOFError, KeyError, IndexError, RuntimeError ... on bad files
        needed = unsafe_globals(path, error) if isinstance(error, pickle.UnpicklingError) and not allow_pickle else []
        if needed:
            raise pickle_refused(path, f"it needs {listed(needed)}") from None
        raise not_a_checkpoint(path, unreadable_reason(path, error)) from None


def pt2_pickled_entries(archive: zipfile.ZipFile) -> list[str]:
    """Entries torch.export.load would unpickle without weights_only (it falls back to that silently)."""
    flagged = []
    for name in archive.namelist():
        inner = name.partition("/")[2]
        if inner.startswith("data/") and inner.endswith("_config.json"):
            for fqn, entry in json.loads(archive.read(name)).get("config", {}).items():
                if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                    flagged.append(fqn)
        elif inner.endswith(".pt") and archive.getinfo(name).file_size and unsafe_globals(archive.read(name)):
            flagged.append(inner)
    return flagged


def load_pt2(path: Path, archive: zipfile.ZipFile, allow_pickle: bool) -> StateDict:
    """The state_dict of a ``torch.export.save`` archive: its weights only, unless the file is trusted.

    Refused first if it holds pickled entries; ``torch.export.load`` (which evaluates the graph's shape
    strings) runs only with ``allow_pickle``.
    """
    pickled = pt2_pickled_entries(archive)
    if pickled and not allow_pickle:
        raise pickle_refused(path, f"pickled entries {listed(pickled)}")
    if not allow_pickle:
        return read_pt2_weights(path, archive)
    try:
        with path.open("rb") as file:  # a file object: given a path, torch.export.load insists on '.pt2'
            return dict(torch.export.load(file).state_dict)
    except Exception as error:  # a damaged archive, or one from an incompatible torch version
        raise not_a_checkpoint(path, f"torch.export.load failed: {type(error).__name__}") from None


def torchscript_refused(path: Path) -> CheckpointError:
    """The error for a TorchScript archive when allow_pickle is off."""
    return CheckpointError(
        f"{path} was not loaded: it is a TorchScript archive, and torch.jit.load runs the TorchScript code inside it. "
        f"Re-save just the weights: torch.save(model.state_dict(), path); or, {TRUST_FIX}")


def read_zip_checkpoint(path: Path, params: Params) -> tuple[str, Any] | None:
    """Load a ``.pt2`` or TorchScript archive, after checking the zip for bombs; None for a torch.save zip."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise not_a_checkpoint(path, "a damaged zip archive: truncated or corrupted") from None
    with archive:
        check_inflation(path, archive, params.max_inflation)
        records = {name.partition("/")[2] for name in archive.namelist()}  # ckpt/data.pkl -> data.pkl
        if "archive_format" in records:
            return "torch_export", load_pt2(path, archive, params.allow_pickle)
        if "constants.pkl" not in records:
            check_zip_storages(path, archive)
            return None
    if not params.allow_pickle:
        raise torchscript_refused(path)
    try:
        return "torchscript", torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # a damaged TorchScript archive
        raise not_a_checkpoint(path, f"torch.jit.load failed: {type(error).__name__}") from None


def read_checkpoint(path: Path, params: Params) -> tuple[str, Any]:
    """Detect the file's format from its content and load it: ``(format, loaded object)``."""
    size = path.stat().st_size
    if size == 0:
        raise not_a_checkpoint(path, "the file is empty")
    with path.open("rb") as file:
        head = file.read(9)  # safetensors: 8-byte little-endian header length, then a JSON object
    if path.suffix.lower() == ".safetensors" or (head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8):
        from safetensors.torch import load_file

        try:
            return "safetensors", load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError: a broken header or truncated data
            raise not_a_checkpoint(path, f"unreadable safetensors: {str(error).splitlines()[0][:120]}") from None
    if zipfile.is_zipfile(path):
        read = read_zip_checkpoint(path, params)
        if read is not None:
            return read
    else:
        check_legacy_storages(path)
    loaded = torch_load(path, params.allow_pickle)
    return ("pickled_module" if isinstance(loaded, torch.nn.Module) else "state_dict"), loaded


def read_pretrained(folder: Path, params: Params) -> Weights:
    """The weights of a save_pretrained folder: each shard read like a checkpoint file, as a plain state_dict."""
    if params.state_dict_key is not None:
        raise CheckpointError(f"{folder} is a save_pretrained folder, so state_dict_key {params.state_dict_key!r} names "
                              "nothing in it; remove state_dict_key from the load stage")
    files = weight_files(folder)
    state_dict: StateDict = {}
    for shard in files:
        file_format, loaded = read_checkpoint(shard, params)
        if not is_tensor_dict(loaded):
            raise CheckpointError(f"{shard} holds a {type(loaded).__name__}, not the state_dict save_pretrained writes")
        repeated = sorted(state_dict.keys() & loaded.keys())
        if repeated:
            raise CheckpointError(f"{shard} repeats tensors of an earlier shard ({listed(repeated)}); re-save the model "
                                  "with save_pretrained")
        state_dict.update(loaded)
    return Weights("huggingface", state_dict, shards=len(files))


def read_weights(path: Path, params: Params) -> Weights:
    """The weights of a checkpoint file or save_pretrained folder; an unreadable file is a CheckpointError."""
    try:
        if path.is_dir():
            return read_pretrained(path, params)
        file_format, loaded = read_checkpoint(path, params)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None
    return extract_weights(path, file_format, loaded, params.state_dict_key)


def check_finite(path: Path, state_dict: StateDict) -> None:
    """Refuse weights holding NaN or Inf: the run diverged, and every later stage would be meaningless."""
    floats = {name: tensor for name, tensor in state_dict.items() if tensor.is_floating_point() or tensor.is_complex()}
    bad = [name for name, tensor in floats.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{path} has NaN or Inf values in {len(bad)} tensor(s): {listed(bad)}; "
                              "the training run likely diverged, use an earlier checkpoint")


def checkpoint_bytes(path: Path, weights: Weights) -> int:
    """Bytes of the checkpoint file, or of a save_pretrained folder's weight files."""
    return sum(file.stat().st_size for file in weight_files(path)) if weights.shards else path.stat().st_size


def fit_checkpoint(path: Path, spec: ModelSpec, params: Params) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The recipe's model with the checkpoint's weights loaded into it, and the metrics of how they were found."""
    model = build_model(spec, path)
    model_state = model.state_dict()
    weights = read_weights(path, params)
    state_dict, prefix = strip_prefix(path, weights.state_dict, set(model_state), params.strip_prefix)
    check_view_extents(path, state_dict, params.max_inflation)
    check_finite(path, state_dict)
    differences = compare_keys(path, spec, state_dict, model_state, params.strict)
    skipped = set(differences["unexpected_keys"]) | set(differences["mismatched_keys"])
    matching = {key: tensor for key, tensor in state_dict.items() if key not in skipped}
    try:
        model.load_state_dict(matching, strict=params.strict and not differences["tied_keys"])
    except RuntimeError as error:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"{path}: loading into {spec.factory} failed: {error}") from None
    extras = weights.extras
    metrics = {
        "format": weights.format,
        "checkpoint_bytes": checkpoint_bytes(path, weights),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "tensors_loaded": len(matching),
        "state_dict_key": weights.key,
        "prefix_stripped": prefix,
        "extra_entries": sorted(extras),
        "has_optimizer_state": any(  # an entry left None or empty holds no state
            "optimizer" in name and value is not None and not (isinstance(value, (Mapping, list)) and not value)
            for name, value in extras.items()),
        **differences,
    }
    if weights.shards is not None:
        metrics["shards"] = weights.shards
    epoch = extras.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        metrics["epoch"] = epoch
    return model, metrics


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Build the recipe's model, load the checkpoint's weights into it, and save it for the next stages."""
    if ctx.checkpoint_path is None or not (Path(ctx.checkpoint_path).is_file() or Path(ctx.checkpoint_path).is_dir()):
        given = ctx.checkpoint_path or "none was given"
        raise CheckpointError(f"load_checkpoint needs a checkpoint file or save_pretrained folder: {given} is neither")
    model, metrics = fit_checkpoint(Path(ctx.checkpoint_path), ctx.recipe.model, params)
    return StageOutput(product=save_torch_module(model.eval(), ctx.workdir), metrics=metrics)


STAGE = declare_stage(
    takes=(), makes="torch", inputs="none", version=1, params=Params, run=run, capabilities={"checkpoint"},
)
