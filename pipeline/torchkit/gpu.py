"""What this machine offers for GPU stages (CUDA, TensorRT, torch-tensorrt): detection only.

Feature detection happens once per process and answers with a reason instead of raising: ``None`` when a
feature is usable, else one line saying what is missing and how to get it. Stages check it when they
run (``require``), so a machine without a GPU fails or skips one stage with that line, never at import.
TensorRT and torch-tensorrt are imported only inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from typing import Any, Callable, Iterable

from pipeline.errors import StageError, StageUnavailable, one_line

INSTALL_HINT = "pip install 'optipipe[tensorrt]' on a machine with an NVIDIA driver"
MIN_TENSORRT_MAJOR = 10  # the runner and the builder use TensorRT 10's named-tensor API


@functools.cache
def cuda_status() -> str | None:
    """None when a CUDA device is usable, else why not (one line)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
    return f"no CUDA device: torch.cuda.is_available() is False{build}"


@functools.cache
def tensorrt_status() -> str | None:
    """None when TensorRT 10+ imports, else why not (the import error's first line and how to install it)."""
    try:
        import tensorrt
    except Exception as error:  # ImportError, or OSError/RuntimeError when libnvinfer or the driver is missing
        return f"TensorRT not installed ({one_line(error)}): {INSTALL_HINT}"
    major = str(tensorrt.__version__).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        return f"TensorRT {tensorrt.__version__} is too old (TensorRT {MIN_TENSORRT_MAJOR} or newer is needed): {INSTALL_HINT}"
    return None


@functools.cache
def torch_tensorrt_status() -> str | None:
    """None when torch-tensorrt imports, else why not (the import error's first line and how to install it)."""
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as error:  # it raises more than ImportError when TensorRT's libraries are absent
        return f"torch-tensorrt not installed ({one_line(error)}): {INSTALL_HINT}"
    return None


def require(checks: Iterable[Callable[[], str | None]], *, stage: str, not_built: str, on_unavailable: str) -> None:
    """Return when every check passes; else ``StageUnavailable`` (on_unavailable: skip) or ``StageError`` (fail).

    The first failing check's reason leads the message, followed by what was not built.
    """
    reason = next((found for check in checks if (found := check()) is not None), None)
    if reason is None:
        return
    if on_unavailable == "skip":
        raise StageUnavailable(f"{reason}: {not_built}")
    raise StageError(
        f"{stage}: {reason}: {not_built}; set on_unavailable: skip to skip this stage where it cannot run, "
        "or run it on a machine with an NVIDIA GPU"
    )


def _package_version(module_name: str, distribution: str) -> str | None:
    """A package's version without importing it (its module's ``__version__`` when it is already imported)."""
    module = sys.modules.get(module_name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_identity() -> dict[str, Any]:
    """What a TensorRT engine is tied to: GPU name, compute capability ("9.0"), CUDA and TensorRT versions.

    Values are None where the machine lacks the thing (no CUDA device, no TensorRT).
    """
    import torch

    identity: dict[str, Any] = {
        "gpu_name": None,
        "compute_capability": None,
        "cuda_version": torch.version.cuda,
        "tensorrt_version": None,
        "torch_tensorrt_version": None,
    }
    if cuda_status() is None:
        major, minor = torch.cuda.get_device_capability()
        identity.update(gpu_name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    if tensorrt_status() is None:
        import tensorrt

        identity["tensorrt_version"] = str(tensorrt.__version__)
    identity["torch_tensorrt_version"] = _package_version("torch_tensorrt", "torch-tensorrt")
    return identity


def _describe(identity: dict[str, Any]) -> str:
    """``NVIDIA H200 (sm 9.0) with TensorRT 10.13.0.35``, or what is missing."""
    gpu = f"{identity['gpu_name']} (sm {identity['compute_capability']})" if identity.get("gpu_name") else "no CUDA device"
    tensorrt = f"TensorRT {identity['tensorrt_version']}" if identity.get("tensorrt_version") else "no TensorRT"
    return f"{gpu} with {tensorrt}"


def check_engine_compatible(meta: dict[str, Any]) -> None:
    """StageError unless this machine has the GPU, compute capability and TensorRT version the engine was built with.

    A serialized engine holds kernels chosen for one GPU and one TensorRT release; loading it elsewhere
    fails inside TensorRT or runs untuned kernels. Keys the meta lacks are not compared.
    """
    here = gpu_identity()
    keys = ("gpu_name", "compute_capability", "tensorrt_version")
    if all(meta.get(key) is None or meta.get(key) == here.get(key) for key in keys):
        return
    built = {key: meta.get(key) or "?" for key in keys}
    raise StageError(f"engine built for {_describe(built)}; this machine has {_describe(here)}: rebuild it here")
