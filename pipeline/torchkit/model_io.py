"""What a model takes and returns, from the recipe's one declaration (``model.inputs`` / ``input_shape``, ``model.output``).

Every stage, runner, exporter, calibration reader and benchmark goes through :class:`ModelIO`: batches from
any loader become *feeds* (input name -> numpy array, batch first, in the declared dtypes), feeds become
the forward's arguments (by keyword when the forward names every input, else in declared order), and the
forward's result (a tensor, tuple, dict or ``ModelOutput``) gives up its prediction tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError, StageError
from pipeline.recipe.schema import BATCH_DIM, FLOAT_DTYPES, SHORTHAND_INPUT, InputSpec, ModelSpec, OutputSpec

Feeds = dict[str, np.ndarray]  # one batch: input name -> array, batch first
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
# Feeds hold floats as float32 (numpy has no bfloat16); a runner casts them to what its model computes in.
NUMPY_DTYPES = {name: (np.float32 if name in FLOAT_DTYPES else torch.empty(0, dtype=dtype).numpy().dtype) for name, dtype in TORCH_DTYPES.items()}
TARGET_KEYS = ("labels", "label", "targets", "target")
DEFAULT_PREDICTION = "logits"


def feeds_length(feeds: Feeds) -> int:
    """Rows (batch size) of a set of feeds."""
    return len(next(iter(feeds.values())))


def feed_rows(feeds: Feeds, index: np.ndarray | slice) -> Feeds:
    """The rows ``index`` of every input (a new, contiguous array each)."""
    return {name: np.ascontiguousarray(array[index]) for name, array in feeds.items()}


def cycled_rows(feeds: Feeds, size: int) -> Feeds:
    """``size`` rows taken in turn, repeating from the start when the feeds have fewer."""
    return feed_rows(feeds, np.arange(size) % feeds_length(feeds))


def feed_shapes(feeds: Feeds) -> str:
    """The feeds' shapes for messages: ``[8, 1, 8, 8]`` for one input, ``input_ids [8, 16], attention_mask [8, 16]`` for more."""
    if len(feeds) == 1:
        return str(list(next(iter(feeds.values())).shape))
    return ", ".join(f"{name} {list(array.shape)}" for name, array in feeds.items())


def described(value: Any) -> str:
    """A short description of a batch element for error messages: ``Tensor[64, 16] int64``, ``dict``, ..."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def select_path(outputs: Any, path: str | int | None) -> tuple[Any, str]:
    """The part of ``outputs`` at ``path`` (name, index or dotted path) and the path's name; StageError naming what is there."""
    if path is None:
        if isinstance(outputs, torch.Tensor):
            return outputs, DEFAULT_PREDICTION
        if isinstance(outputs, Mapping):
            if DEFAULT_PREDICTION in outputs:
                return outputs[DEFAULT_PREDICTION], DEFAULT_PREDICTION
            raise StageError(
                f"the model returns a {type(outputs).__name__} without '{DEFAULT_PREDICTION}' (it has: {', '.join(map(str, outputs))}); "
                "name the prediction with model.output"
            )
        if isinstance(outputs, Sequence) and outputs:
            return outputs[0], "0"
        raise StageError(f"the model returns a {type(outputs).__name__}; set model.output to the prediction inside it")
    current = outputs
    for part in str(path).split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, Sequence) and not isinstance(current, str) and part.lstrip("-").isdigit() and -len(current) <= int(part) < len(current):
            current = current[int(part)]
        else:
            there = ", ".join(map(str, current)) if isinstance(current, Mapping) else (
                f"indices 0..{len(current) - 1}" if isinstance(current, Sequence) else described(current))
            raise StageError(f"model.output {path!r}: the model's output has no {part!r} (there: {there})")
    return current, str(path)


def flatten_outputs(outputs: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``outputs`` with its dotted path (``logits``, ``hidden_states.2``), in order."""
    if isinstance(outputs, torch.Tensor):
        return [(prefix or DEFAULT_PREDICTION, outputs)]
    if isinstance(outputs, Mapping):
        items: Sequence[tuple[Any, Any]] = list(outputs.items())
    elif isinstance(outputs, (tuple, list)):
        items = list(enumerate(outputs))
    else:
        return []
    flat = []
    for key, value in items:
        flat += flatten_outputs(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


class ModelIO:
    """The declared inputs and output of the recipe's model, and how batches and forwards are translated."""

    def __init__(self, specs: Sequence[InputSpec], output: OutputSpec | None = None, declared_by: str = "model.inputs"):
        self.specs = tuple(specs)
        self.declared_by = declared_by  # the recipe field messages name: model.inputs or model.input_shape
        self.names = tuple(spec.name for spec in self.specs)
        self.output = output or OutputSpec()
        self._keyword_calls: dict[type, bool] = {}

    @classmethod
    def of(cls, model: ModelSpec) -> "ModelIO":
        """The IO of a recipe's ``model`` section."""
        output = model.output if isinstance(model.output, OutputSpec) else OutputSpec(prediction=model.output)
        return cls(model.input_specs(), output, "model.input_shape" if model.input_shape is not None else "model.inputs")

    @classmethod
    def single(cls) -> "ModelIO":
        """One float32 input of any rank, the prediction the forward's tensor: a plain ``model(x)``."""
        return cls([InputSpec(name=SHORTHAND_INPUT, shape=[BATCH_DIM])])

    @property
    def symbolic_dims(self) -> list[str]:
        """Names of the dims that may vary (batch first), each once."""
        dims: list[str] = []
        for spec in self.specs:
            dims += [dim for dim in spec.shape if isinstance(dim, str) and dim not in dims]
        return dims

    # --- batches into feeds -------------------------------------------------------------------------------------

    def split_batch(self, batch: Any, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A loader's batch as (input name -> tensor, target tensor), or a DataError saying what it yields instead.

        Accepted: ``(inputs, target)`` with inputs a tensor, a tuple of tensors in declared order or a dict by name;
        ``(input_1, ..., input_n, target)`` for n declared inputs; a dict with a ``labels`` (or ``label``) entry.
        """
        if isinstance(batch, Mapping):
            key = next((name for name in TARGET_KEYS if name in batch), None)
            if key is None:
                raise DataError(
                    f"the {split} loader yielded a dict without a target (keys: {', '.join(map(str, batch))}); "
                    f"put the targets under one of {', '.join(TARGET_KEYS)}, or yield (inputs, target) pairs"
                )
            inputs: Any = {name: value for name, value in batch.items() if name != key}
            target = batch[key]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, target = batch
        elif isinstance(batch, (tuple, list)) and len(self.names) > 1 and len(batch) == len(self.names) + 1:
            inputs, target = tuple(batch[:-1]), batch[-1]
        else:
            count = f"a {len(batch)}-item {type(batch).__name__}" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
            raise DataError(
                f"the {split} loader yielded {count}; it must yield (inputs, target) pairs, with inputs a tensor, a tuple "
                f"of {len(self.names)} or a dict by name ({', '.join(self.names)}), or a dict holding 'labels'"
            )
        if not isinstance(target, torch.Tensor):
            raise DataError(f"the {split} loader's targets must be a tensor; it yielded {described(target)}")
        return self.named_inputs(inputs, split), target

    def named_inputs(self, inputs: Any, split: str) -> dict[str, torch.Tensor]:
        """Batch inputs (a tensor, a tuple in declared order, or a dict by name) as input name -> tensor."""
        if isinstance(inputs, Mapping):
            missing = [name for name in self.names if name not in inputs]
            extra = [str(name) for name in inputs if name not in self.names]
            if missing or extra:
                parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                    [f"not declared: {', '.join(extra)} (declare them in model.inputs, or leave them out of the batch)"] if extra else [])
                raise DataError(f"the {split} loader's inputs do not match model.inputs ({', '.join(self.names)}): {'; '.join(parts)}")
            named = {name: inputs[name] for name in self.names}
        elif isinstance(inputs, torch.Tensor):
            if len(self.names) != 1:
                raise DataError(
                    f"the {split} loader yielded one input tensor but model.inputs declares {len(self.names)} "
                    f"({', '.join(self.names)}); yield them as a tuple or a dict"
                )
            named = {self.names[0]: inputs}
        elif isinstance(inputs, (tuple, list)):
            if len(inputs) != len(self.names):
                raise DataError(
                    f"the {split} loader yielded {len(inputs)} inputs but model.inputs declares {len(self.names)} "
                    f"({', '.join(self.names)}); declare each in model.inputs, in the forward's order"
                )
            named = dict(zip(self.names, inputs))
        else:
            raise DataError(f"the {split} loader's inputs must be tensors; it yielded {described(inputs)}")
        wrong = {name: value for name, value in named.items() if not isinstance(value, torch.Tensor)}
        if wrong:
            name, value = next(iter(wrong.items()))
            raise DataError(f"the {split} loader's input {name} must be a tensor; it yielded {described(value)}")
        return {spec.name: named[spec.name].to(TORCH_DTYPES[spec.dtype]) for spec in self.specs}

    def to_feeds(self, tensors: Mapping[str, torch.Tensor]) -> Feeds:
        """Named tensors as feeds: numpy arrays in the declared dtypes (floats as float32)."""
        return {spec.name: tensors[spec.name].detach().cpu().numpy().astype(NUMPY_DTYPES[spec.dtype], copy=False) for spec in self.specs}

    def check_feeds(self, feeds: Feeds, where: str) -> dict[str, int]:
        """DataError unless every input has its declared rank and fixed dims, and shared names agree; the symbolic dims' sizes."""
        sizes: dict[str, int] = {}
        for spec in self.specs:
            shape = feeds[spec.name].shape
            subject = "the input" if self.declared_by == "model.input_shape" else f"input {spec.name}"
            if len(shape) != len(spec.shape):
                raise DataError(
                    f"{where}: {subject} is shaped {list(shape)} but {self.declared_by} declares {len(spec.shape)} "
                    f"dimensions {list(spec.shape)}; fix the data source or {self.declared_by}"
                )
            for axis, (size, declared) in enumerate(zip(shape, spec.shape)):
                if isinstance(declared, int) and axis > 0 and size != declared:
                    raise DataError(
                        f"{where}: {subject} is shaped {list(shape)} but {self.declared_by} fixes dimension {axis} to {declared} "
                        f"({list(spec.shape)}); fix the data source or {self.declared_by} (a name such as seq lets a dimension vary)"
                    )
                if isinstance(declared, str):
                    if sizes.setdefault(declared, size) != size:
                        raise DataError(f"{where}: dimension {declared} is {sizes[declared]} in one input and {size} in {spec.name}; inputs sharing a name must agree")
        return sizes

    # --- feeds into forwards ------------------------------------------------------------------------------------

    def tensors(self, feeds: Feeds, device: torch.device | str = "cpu", float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Feeds as tensors on ``device``: floats in ``float_dtype`` (default: declared), the rest as declared."""
        made = {}
        for spec in self.specs:
            dtype = float_dtype if float_dtype is not None and spec.dtype in FLOAT_DTYPES else TORCH_DTYPES[spec.dtype]
            made[spec.name] = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(device, dtype)
        return made

    def by_keyword(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s forward names every declared input (then it is called by keyword, else positionally)."""
        kind = type(module)
        if kind not in self._keyword_calls:
            try:
                parameters = inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                parameters = {}
            self._keyword_calls[kind] = len(self.names) > 1 and all(name in parameters for name in self.names)
        return self._keyword_calls[kind]

    def arguments(self, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """``(args, kwargs)`` that call ``module`` with these inputs."""
        if self.by_keyword(module):
            return (), {name: tensors[name] for name in self.names}
        return tuple(tensors[name] for name in self.names), {}

    def call(self, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Any:
        """The forward's whole result for these inputs."""
        args, kwargs = self.arguments(module, tensors)
        return module(*args, **kwargs)

    def prediction(self, outputs: Any) -> torch.Tensor:
        """The prediction tensor inside a forward's result, as ``model.output`` says."""
        selected, _ = select_path(outputs, self.output.prediction)
        if not isinstance(selected, torch.Tensor):
            raise StageError(
                f"model.output {self.output.prediction!r} selects a {type(selected).__name__}, not a tensor; point it at the prediction tensor"
            )
        return selected

    def predict(self, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The module's prediction tensor for these inputs."""
        return self.prediction(self.call(module, tensors))

    @property
    def prediction_name(self) -> str:
        """The prediction's name in exported files: ``logits`` unless model.output names another path."""
        return DEFAULT_PREDICTION if self.output.prediction is None else str(self.output.prediction)

    # --- made-up inputs -----------------------------------------------------------------------------------------

    def synthetic(self, batch: int, dims: Mapping[str, int] | None = None, seed: int = 0) -> Feeds:
        """Valid random feeds of ``batch`` rows: token ids inside the vocabulary, masks 0/1, floats in their range.

        ``dims`` gives the other symbolic dims' sizes (default 8 each); fixed dims are as declared.
        """
        generator = np.random.default_rng(seed)
        sizes = {**{name: 8 for name in self.symbolic_dims}, **dict(dims or {})}
        feeds: Feeds = {}
        for spec in self.specs:
            shape = [batch] + [dim if isinstance(dim, int) else sizes[dim] for dim in spec.shape[1:]]
            low, high = spec.value_range
            if spec.dtype in FLOAT_DTYPES:
                values = generator.uniform(low, high, size=shape)
            else:
                values = generator.integers(int(low), int(high), size=shape)
            feeds[spec.name] = values.astype(NUMPY_DTYPES[spec.dtype])
        return feeds
