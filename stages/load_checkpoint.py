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
names fit the model, or as ``strip_prefix`` says. A Hugging Face ``save_pretrained`` folder is a checkpoint
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")  # preferred, in this order, when several entries hold tensors
SHOWN = 5
StateDict = dict[str, torch.Tensor]


def listed(names: list[str]) -> str:
    """The first few names, and '...' when there are more."""
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


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


def is_tensor_dict(value: Any) -> bool:
    """A non-empty mapping of names to tensors: what a state_dict is."""
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


@dataclass
class Weights:
    """The tensors a checkpoint holds and where they were found in it."""

    format: str
    state_dict: StateDict
    extras: dict[str, Any] = field(default_factory=dict)  # a training dict's other top-level entries
    key: str | None = None  # the training dict's entry that held them
    shards: int | None = None  # a save_pretrained folder's weight files


def weight_entries(loaded: Mapping[Any, Any]) -> dict[str, StateDict]:
    """A training dict's top-level entries that hold weights (a state_dict, or a module), by key."""
    entries = {}
    for key, value in loaded.items():
        value = value.state_dict() if isinstance(value, torch.nn.Module) else value
        if isinstance(key, str) and is_tensor_dict(value):
            entries[key] = dict(value)
    return entries


def choose_entry(path: Path, loaded: Mapping[Any, Any], chosen: str | None) -> str:
    """Which entry of a training dict holds the weights: ``chosen``, the only one holding tensors, or a known key."""
    entries = weight_entries(loaded)
    named = ", ".join(repr(key) for key in entries)
    if chosen is not None:
        if chosen not in entries:
            raise CheckpointError(f"{path} has no weights under state_dict_key {chosen!r}; the entries holding weights are: "
                                  f"{named or 'none'}")
        return chosen
    if len(entries) == 1:
        return next(iter(entries))
    known = [key for key in WEIGHT_KEYS if key in entries]
    if known:
        return known[0]
    if entries:
        raise CheckpointError(f"{path} holds weights under several entries ({named}); choose one with "
                              "`with: {state_dict_key: NAME}` on the load stage")
    raise CheckpointError(
        f"{path} holds a dict without weights (keys: {listed([repr(name) for name in loaded]) or 'none'}); expected "
        "a state_dict (name -> tensor) or a training dict with one under any key (e.g. 'model_state_dict', 'net')"
    )


def extract_weights(path: Path, file_format: str, loaded: Any, chosen: str | None = None) -> Weights:
    """Find the weights in what was loaded: a module's, a state_dict, or a training dict's entry ``chosen`` or found."""
    if isinstance(loaded, torch.nn.Module):
        weights = Weights(file_format, dict(loaded.state_dict()))
    elif is_tensor_dict(loaded):
        weights = Weights(file_format, dict(loaded))
    elif isinstance(loaded, Mapping):
        key = choose_entry(path, loaded, chosen)
        extras = {str(name): value for name, value in loaded.items() if name != key}
        return Weights("training_dict", weight_entries({key: loaded[key]})[key], extras, key)
    else:
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state_dict or a model")
    if chosen is not None:
        raise CheckpointError(f"{path} is not a training dict, so state_dict_key {chosen!r} names nothing in it; "
                              "remove state_dict_key from the load stage")
    return weights


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


def shared_prefixes(keys: Iterable[str]) -> list[str]:
    """The dotted prefixes every key starts with, outermost first, each leaving a name: ``['module.', 'module._orig_mod.']``."""
    split = [key.split(".") for key in keys]
    if not split:
        return []
    prefixes = []
    for depth in range(1, min(len(parts) for parts in split)):
        head = split[0][:depth]
        if any(parts[:depth] != head for parts in split):
            break
        prefixes.append(".".join(head) + ".")
    return prefixes


def without_prefix(path: Path, state_dict: StateDict, prefix: str) -> StateDict:
    """The state_dict with ``prefix`` removed from the names that start with it."""
    stripped = {key.removeprefix(prefix): tensor for key, tensor in state_dict.items()}
    if len(stripped) < len(state_dict):
        raise CheckpointError(f"{path}: removing {prefix!r} makes two tensor names the same; set strip_prefix to a longer prefix")
    return stripped


def strip_wrapper_prefix(state_dict: StateDict, model_keys: set[str]) -> tuple[StateDict, str | None]:
    """Drop the prefix every checkpoint name shares (DDP ``module.``, torch.compile ``_orig_mod.``, a LightningModule's
    ``model.`` or ``net.``, ``backbone.``, nested ones) whose removal makes the most names fit the model, if any does."""
    best, best_hits = None, len(model_keys & state_dict.keys())
    for prefix in shared_prefixes(state_dict):
        hits = sum(key[len(prefix):] in model_keys for key in state_dict)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if best is None:
        return state_dict, None
    return {key[len(best):]: tensor for key, tensor in state_dict.items()}, best


def strip_prefix(path: Path, state_dict: StateDict, model_keys: set[str], prefix: str | None) -> tuple[StateDict, str | None]:
    """Remove the recipe's ``strip_prefix``, which some name must start with, or else a wrapper prefix found by itself."""
    if prefix is None:
        return strip_wrapper_prefix(state_dict, model_keys)
    if not any(key.startswith(prefix) for key in state_dict):
        shared = shared_prefixes(state_dict)
        found = f"every name starts with {shared[0]!r}" if shared else f"names: {listed(list(state_dict))}"
        raise CheckpointError(f"{path}: no tensor name starts with strip_prefix {prefix!r} ({found}); fix strip_prefix on the load stage")
    return without_prefix(path, state_dict, prefix), prefix


def tied_keys(model_state: StateDict, state_dict: StateDict) -> list[str]:
    """Model tensors the checkpoint lacks that share memory with one it holds: tied weights (an LM head tied to the
    embeddings), which save_pretrained writes once and loading the other fills."""
    loaded = {(tensor.data_ptr(), tensor.shape) for key, tensor in model_state.items() if key in state_dict and tensor.numel()}
    return [key for key, tensor in model_state.items()
            if key not in state_dict and tensor.numel() and (tensor.data_ptr(), tensor.shape) in loaded]


def check_finite(path: Path, state_dict: StateDict) -> None:
    """Refuse weights holding NaN or Inf: the run diverged, and every later stage would be meaningless."""
    floats = {name: tensor for name, tensor in state_dict.items() if tensor.is_floating_point() or tensor.is_complex()}
    bad = [name for name, tensor in floats.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{path} has NaN or Inf values in {len(bad)} tensor(s): {listed(bad)}; "
                              "the training run likely diverged, use an earlier checkpoint")


def prefix_hint(state_dict: StateDict, model_state: StateDict) -> str:
    """A sentence naming the prefix every checkpoint name has and no model name has, with the fix; '' when none."""
    model_prefixes = set(shared_prefixes(model_state))
    lacking = [prefix for prefix in shared_prefixes(state_dict) if prefix not in model_prefixes]
    if not lacking:
        return ""
    return (f" Every checkpoint name starts with {lacking[0]!r} and the model's do not: if the weights are those of a "
            f"wrapper's attribute, set `with: {{strip_prefix: \"{lacking[0]}\"}}` on the load stage.")


def compare_keys(path: Path, spec: ModelSpec, state_dict: StateDict, model_state: StateDict,
                 strict: bool) -> dict[str, list[str]]:
    """Missing, unexpected, mis-shaped and tied tensor names; an error naming them in strict mode, or when none fits.

    ``strict: false`` is suggested only when some tensor would then load.
    """
    tied = tied_keys(model_state, state_dict)
    differences = {
        "missing_keys": [key for key in model_state if key not in state_dict and key not in tied],
        "unexpected_keys": [key for key in state_dict if key not in model_state],
        "mismatched_keys": [key for key, tensor in state_dict.items()
                            if key in model_state and tensor.shape != model_state[key].shape],
        "tied_keys": tied,
    }
    fitting = len(state_dict) - len(differences["unexpected_keys"]) - len(differences["mismatched_keys"])
    if fitting and not (strict and any(differences[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys"))):
        return differences
    shaped = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(model_state[key].shape)}"
              for key in differences["mismatched_keys"]]
    parts = [f"{title} ({len(names)}): {listed(names)}" for title, names in (
        ("missing from the checkpoint", differences["missing_keys"]),
        ("unexpected in the checkpoint", differences["unexpected_keys"]), ("mis-shaped", shaped)) if names]
    found = "; ".join(parts) if fitting else f"none of its {len(state_dict)} tensors fits ({'; '.join(parts)})"
    fix = ", or set `with: {strict: false}` on the load stage to load only the tensors that match" if fitting else ""
    raise CheckpointError(f"{path} does not fit {spec.factory}(**{spec.kwargs}): {found}. Check model.factory and model.kwargs "
                          f"in the recipe{fix}.{prefix_hint(state_dict, model_state)}")


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
