"""Keep only the weights: drop optimizer state, epoch counters and pickled code from the checkpoint.

The product is a plain state_dict (``weights.pt``) that loads with ``torch.load(weights_only=True)``
into the architecture ``model.factory`` builds, so it must follow a stage that kept that architecture
(``load_checkpoint``), not one that fused or pruned it.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import StageError
from pipeline.hf import factory_kwargs
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.handles import ModelHandle, TorchModel, save_torch_weights


class Params(StageParams):
    """No parameters: there is one way to keep only the weights."""


def checkpoint_bytes(ctx: StageContext, source: ModelHandle) -> int:
    """Size of the user's original checkpoint; the input model's size when the run has none on disk."""
    if ctx.checkpoint_path is not None and ctx.checkpoint_path.is_file():
        return ctx.checkpoint_path.stat().st_size
    return source.size_bytes


def check_round_trip(weights: TorchModel, input_name: str, factory: str) -> None:
    """Load the written weights back into a fresh factory model, weights-only, as later stages will."""
    try:
        weights.load()
    except RuntimeError as error:  # load_state_dict: names or shapes differ from the factory's model
        raise StageError(
            f"strip_optimizer: the model from '{input_name}' no longer fits {factory} "
            f"(its architecture was changed upstream); place strip_optimizer right after load_checkpoint. "
            f"{str(error).splitlines()[0]}"
        ) from None


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Save the input model's state_dict alone, and report how many bytes that saved."""
    input_name, source = only_input(inputs)
    module = source.load()
    spec = ctx.recipe.model
    weights = save_torch_weights(module, ctx.workdir, spec.factory, factory_kwargs(spec, ctx.checkpoint_path))
    check_round_trip(weights, input_name, spec.factory)
    bytes_before = checkpoint_bytes(ctx, source)
    bytes_after = weights.path.stat().st_size
    metrics = {
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "saved_fraction": round(1 - bytes_after / bytes_before, 4) if bytes_before else 0.0,
    }
    return StageOutput(product=weights, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run,
)
