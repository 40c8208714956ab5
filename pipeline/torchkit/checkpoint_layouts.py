"""Where the weights sit in a checkpoint as people save them, and how their names are matched to the model's.

A training dict may hold its state_dict under any key (``model_state_dict``, pytorch-cifar's ``net``, an EMA
copy); names may carry a wrapper's prefix (DataParallel's ``module.``, torch.compile's ``_orig_mod.``, a
LightningModule's ``net.``); tied weights are saved once. Pure functions over loaded objects: nothing here
reads a file (``stages/load_checkpoint.py`` does, through ``pipeline.torchkit.checkpoint_files``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError
from pipeline.recipe import ModelSpec

WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")  # preferred, in this order, when several entries hold tensors
SHOWN = 5
StateDict = dict[str, torch.Tensor]


def listed(names: list[str]) -> str:
    """The first few names, and '...' when there are more."""
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


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
