"""Cache identity: everything that determines a stage's output, hashed into its artifact key.

A key covers the stage's name and ``version``, the code it runs (its module and every project module it
imports, normalised so comments and docstrings do not count: ``pipeline.run.code_digest``), its
parameters, the content digests of its inputs (and of the baseline when it is handed one), the
checkpoint's sha256 (source stages), the model factory and the code behind it, the data source's
identity, any factory named in the stage's params (a distillation student), and library versions.
Torch-free: identity is computed before any model is loaded.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.imports import locate_module, split_reference
from pipeline.recipe.plan import Plan, factory_references
from pipeline.recipe.schema import DataSpec
from pipeline.records.files import canonical_json, sha256_file, sha256_text
from pipeline.run.code_digest import DEFAULT_ROOTS, code_digest
from pipeline.run.measure import library_versions
from pipeline.run.registry import declaration, stage_module_name

BUILTIN_DATA_MODULE = "pipeline.torchkit.data"
LIBRARY_FOLDERS = tuple(Path(sysconfig.get_paths()[name]).resolve() for name in ("stdlib", "purelib", "platlib"))


def reference_code_digest(reference: str) -> str:
    """Digest of the code behind a user's ``module:callable``: its module and the project modules it imports.

    The module's own folder (where its top-level package lives) counts as project code beside optipipe's;
    a module installed as a library is keyed by its file alone (its package version is not tracked).
    """
    module_name, _ = split_reference(reference, "reference")
    source = locate_module(module_name)  # found on disk: neither the module nor its parent packages run
    if source is None or source.file is None or not source.file.is_file():
        return "unknown"
    origin = source.file.resolve()
    if any(origin.is_relative_to(folder) for folder in LIBRARY_FOLDERS):
        return sha256_file(origin)
    depth = module_name.count(".") + (1 if origin.name == "__init__.py" else 0)
    return code_digest(module_name, (origin.parents[depth], *DEFAULT_ROOTS))


def data_identity(spec: DataSpec) -> dict[str, Any]:
    """A fingerprint of a ``data`` section: the user factory and its code, or a built-in source and its code."""
    if spec.factory is not None:
        return {"factory": spec.factory, "kwargs": spec.kwargs, "code_sha256": reference_code_digest(spec.factory)}
    return {
        "source": spec.source, "kwargs": spec.kwargs, "batch_size": spec.batch_size, "seed": spec.seed,
        "code_sha256": code_digest(BUILTIN_DATA_MODULE),
    }


@dataclass(frozen=True)
class RunIdentity:
    """What every stage key of one run shares: checkpoint, model, data and library versions."""

    checkpoint_sha256: str
    model: dict[str, Any]
    data: dict[str, Any]
    versions: dict[str, str]

    @classmethod
    def of(cls, plan: Plan, checkpoint_sha256: str) -> "RunIdentity":
        """The identity of running ``plan`` on the checkpoint with ``checkpoint_sha256``."""
        recipe = plan.recipe
        model = {**recipe.model.model_dump(mode="json"), "code_sha256": reference_code_digest(recipe.model.factory),
                 "task": recipe.task, "metric": recipe.metric.model_dump(mode="json") if recipe.metric else None}
        if recipe.metric is not None and recipe.metric.function is not None:  # the user's metric code scores every stage
            model["metric_code_sha256"] = reference_code_digest(recipe.metric.function)
        return cls(
            checkpoint_sha256=checkpoint_sha256,
            model=model,
            data=data_identity(plan.recipe.data),
            versions=library_versions(),
        )


def cache_payload(plan: Plan, name: str, identity: RunIdentity, input_digests: list[str], baseline_digest: str | None) -> dict[str, Any]:
    """Everything that determines stage ``name``'s output; its canonical sha256 is the cache key."""
    uses = plan.uses_of(name)
    declared = declaration(uses)
    params = plan.params[name].model_dump(mode="json")
    payload: dict[str, Any] = {
        "uses": uses,
        "stage_version": declared.version,
        "code_sha256": code_digest(stage_module_name(uses)),
        "params": params,
        "inputs": input_digests,
        "model": identity.model,
        "data": identity.data,
        "versions": identity.versions,
    }
    factories = factory_references(params)
    if factories:  # a user's module named in params (a distillation student): edits to it rebuild the stage
        payload["factory_code"] = {reference: reference_code_digest(reference) for _, reference in factories}
    if declared.inputs == "none":
        payload["checkpoint_sha256"] = identity.checkpoint_sha256
    if baseline_digest is not None:
        payload["baseline"] = baseline_digest
    return payload


def cache_key(payload: dict[str, Any]) -> str:
    """Full sha256 of the canonical JSON of a cache payload."""
    return sha256_text(canonical_json(payload))
