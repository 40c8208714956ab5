"""Source stage: read the user's checkpoint into the architecture that ``model.factory`` builds.

Formats are told apart by content, not suffix: a state_dict (plain or in a training dict), safetensors,
TorchScript, torch.export ``.pt2``, and a whole pickled module, which (like anything else that would run
code from the file: TorchScript, torch.export.load) is loaded only when the recipe sets ``allow_pickle``.
Without it a ``.pt2`` gives only its weights, read without evaluating its graph. Declared sizes are checked
against the bytes the file holds before torch allocates (``max_inflation``); what each format gets is
described in ``pipeline.torchkit.checkpoint_files``.
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

from pipeline.errors import CheckpointError
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


WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")
WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel/DDP, Lightning
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


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Call the recipe's ``model.factory`` with its kwargs; a failing factory is a recipe error."""
    return build_module(
        spec.factory,
        spec.kwargs,
        "model.factory",
        raised="{field}: {call} raised {error_type}: {error_text}",
        returned="{field}: {factory} returned a {kind}, not a torch.nn.Module",
    )


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


def extract_weights(path: Path, file_format: str, loaded: Any) -> tuple[str, StateDict, dict[str, Any]]:
    """Find the weights in what was loaded: ``(format, state_dict, the other top-level entries)``."""
    if isinstance(loaded, torch.nn.Module):
        return file_format, dict(loaded.state_dict()), {}
    if is_tensor_dict(loaded):
        return file_format, dict(loaded), {}
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state_dict or a model")
    for key in WEIGHT_KEYS:
        weights = loaded.get(key)
        weights = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        if is_tensor_dict(weights):
            return "training_dict", dict(weights), {str(name): value for name, value in loaded.items() if name != key}
    raise CheckpointError(
        f"{path} holds a dict without weights (keys: {listed([repr(name) for name in loaded]) or 'none'}); expected "
        f"a state_dict (name -> tensor) or one under {', '.join(repr(key) for key in WEIGHT_KEYS)}"
    )


def strip_wrapper_prefix(state_dict: StateDict, model_keys: set[str]) -> tuple[StateDict, str | None]:
    """Drop a DDP ``module.`` or Lightning ``model.`` prefix that every checkpoint key has and the model lacks."""
    for prefix in WRAPPER_PREFIXES:
        if not all(key.startswith(prefix) for key in state_dict):
            continue
        stripped = {key[len(prefix):]: tensor for key, tensor in state_dict.items()}
        hits_raw, hits_stripped = len(model_keys & state_dict.keys()), len(model_keys & stripped.keys())
        model_has_prefix = bool(model_keys) and all(key.startswith(prefix) for key in model_keys)
        if hits_stripped > hits_raw or (hits_stripped == hits_raw and not model_has_prefix):
            return stripped, prefix
    return state_dict, None


def check_finite(path: Path, state_dict: StateDict) -> None:
    """Refuse weights holding NaN or Inf: the run diverged, and every later stage would be meaningless."""
    floats = {name: tensor for name, tensor in state_dict.items() if tensor.is_floating_point() or tensor.is_complex()}
    bad = [name for name, tensor in floats.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{path} has NaN or Inf values in {len(bad)} tensor(s): {listed(bad)}; "
                              "the training run likely diverged, use an earlier checkpoint")


def compare_keys(path: Path, spec: ModelSpec, state_dict: StateDict, model_state: StateDict,
                 strict: bool) -> dict[str, list[str]]:
    """Missing, unexpected and mis-shaped tensor names; in strict mode any of them is an error naming them."""
    differences = {
        "missing_keys": [key for key in model_state if key not in state_dict],
        "unexpected_keys": [key for key in state_dict if key not in model_state],
        "mismatched_keys": [key for key, tensor in state_dict.items()
                            if key in model_state and tensor.shape != model_state[key].shape],
    }
    if strict and any(differences.values()):
        shaped = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(model_state[key].shape)}"
                  for key in differences["mismatched_keys"]]
        parts = [f"{title} ({len(names)}): {listed(names)}" for title, names in (
            ("missing from the checkpoint", differences["missing_keys"]),
            ("unexpected in the checkpoint", differences["unexpected_keys"]), ("mis-shaped", shaped)) if names]
        raise CheckpointError(
            f"{path} does not fit {spec.factory}(**{spec.kwargs}): {'; '.join(parts)}. Check model.factory and model.kwargs "
            "in the recipe, or set `with: {strict: false}` on the load stage to load only the tensors that match"
        )
    return differences


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Build the recipe's model, load the checkpoint's weights into it, and save it for the next stages."""
    if ctx.checkpoint_path is None or not Path(ctx.checkpoint_path).is_file():
        given = ctx.checkpoint_path or "none was given"
        raise CheckpointError(f"load_checkpoint needs a checkpoint file: {given} is not one")
    path = Path(ctx.checkpoint_path)
    model = build_model(ctx.recipe.model)
    model_state = model.state_dict()
    try:
        file_format, loaded = read_checkpoint(path, params)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None
    file_format, state_dict, extras = extract_weights(path, file_format, loaded)
    state_dict, prefix = strip_wrapper_prefix(state_dict, set(model_state))
    check_view_extents(path, state_dict, params.max_inflation)
    check_finite(path, state_dict)
    differences = compare_keys(path, ctx.recipe.model, state_dict, model_state, params.strict)
    skipped = set(differences["unexpected_keys"]) | set(differences["mismatched_keys"])
    matching = {key: tensor for key, tensor in state_dict.items() if key not in skipped}
    if not matching:
        raise CheckpointError(f"{path}: none of its {len(state_dict)} tensors fits {ctx.recipe.model.factory}; "
                              "check model.factory and model.kwargs in the recipe")
    try:
        model.load_state_dict(matching, strict=params.strict)
    except RuntimeError as error:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"{path}: loading into {ctx.recipe.model.factory} failed: {error}") from None
    metrics = {
        "format": file_format,
        "checkpoint_bytes": path.stat().st_size,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "tensors_loaded": len(matching),
        "prefix_stripped": prefix,
        "extra_entries": sorted(extras),
        "has_optimizer_state": any(  # an entry left None or empty holds no state
            "optimizer" in name and value is not None and not (isinstance(value, (Mapping, list)) and not value)
            for name, value in extras.items()),
        **differences,
    }
    epoch = extras.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        metrics["epoch"] = epoch
    return StageOutput(product=save_torch_module(model.eval(), ctx.workdir), metrics=metrics)


STAGE = declare_stage(
    takes=(), makes="torch", inputs="none", version=1, params=Params, run=run, capabilities={"checkpoint"},
)


STAGE = declare_stage(
    takes=(), makes="torch", inputs="none", version=1, params=Params, run=run, capabilities={"checkpoint"},
)
