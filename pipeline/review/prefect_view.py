"""How a run reads in the Prefect UI: flow run names, tags, and the variants table artifact in human units.

A flow run is named ``recipe · checkpoint file · run id`` and tagged with the recipe and checkpoint
names (and ``nightly`` for a nightly run and the optimize run it starts), so runs can be told apart
and filtered. The run id is known only once the run record exists, so the name given at the start
says ``new run`` and ``name_flow_run`` renames it when the record is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run as current_flow_run

from pipeline.errors import OptipipeError
from pipeline.recipe import load_recipe
from pipeline.review.stage_facts import stage_highlights
from pipeline.review.tables import variant_rows
from pipeline.review.units import format_bytes, format_delta, format_figure, metric_label

NIGHTLY_TAG = "nightly"


def recipe_name(recipe_path: str, overrides: list[str] | None) -> str:
    """The recipe's own name, or its file name's stem when the recipe does not load (the run then says why)."""
    try:
        return load_recipe(recipe_path, overrides).recipe.name
    except (OptipipeError, OSError, ValueError):
        return Path(recipe_path).stem


def run_title(recipe: str, checkpoint: str, run_id: str | None) -> str:
    """``recipe · checkpoint file name · run id`` (``new run`` before the run id is known)."""
    return f"{recipe} · {Path(checkpoint).name} · {run_id or 'new run'}"


def optimize_run_name() -> str:
    """The ``optimize`` flow run's name, from its parameters (Prefect's ``flow_run_name`` callable)."""
    parameters = current_flow_run.parameters
    return run_title(recipe_name(parameters["recipe_path"], parameters.get("overrides")),
                     parameters["checkpoint_path"], parameters.get("run_id"))


def nightly_run_name() -> str:
    """The ``nightly`` flow run's name: recipe, the checkpoints it picks from, and that it is the nightly run."""
    parameters = current_flow_run.parameters
    return f"{recipe_name(parameters['recipe_path'], parameters.get('overrides'))} · {Path(parameters['checkpoints']).name} · nightly"


def _tags_for(flow_name: str, parameters: dict[str, Any]) -> list[str]:
    """The recipe name, the checkpoint (or checkpoints folder) name, and ``nightly`` for the nightly flow."""
    checkpoint = parameters.get("checkpoint_path") or parameters.get("checkpoints") or ""
    tags = [recipe_name(parameters["recipe_path"], parameters.get("overrides")), Path(checkpoint).name]
    return tags + ([NIGHTLY_TAG] if flow_name == "nightly" else [])


def tag_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_running`` hook: tag the flow run with its recipe and checkpoint, keeping its parent flow run's tags
    (an optimize run started by ``nightly`` is tagged ``nightly`` too)."""
    with get_client(sync_client=True) as client:
        inherited: list[str] = []
        if current_flow_run.parent_flow_run_id:
            inherited = list(client.read_flow_run(current_flow_run.parent_flow_run_id).tags or [])
        tags = [*flow_run.tags, *inherited, *_tags_for(flow.name, flow_run.parameters)]
        client.update_flow_run(flow_run.id, tags=sorted({tag for tag in tags if tag}))


def name_flow_run(record: dict[str, Any]) -> None:
    """Rename the current flow run with the run id its record now has."""
    if current_flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(current_flow_run.id, name=run_title(record["recipe"]["name"], record["checkpoint"]["path"], record["run_id"]))


def variant_table(record: dict[str, Any]) -> list[dict[str, str]]:
    """The variants as the Prefect table artifact shows them: few columns, named for a reader (the run's metric by
    its name: top-1, MSE, ...), in human units."""
    table = []
    for row in variant_rows(record):
        timed = row["latency_p50_ms"] is not None
        batch = f" @{row['latency_batch']}" if timed else ""
        label = metric_label(row["metric"])
        table.append({
            "variant": row["variant"],
            "kind": row["kind"],
            label: format_figure(row["metric"], row["value"]),
            f"Δ {label}": format_delta(row["metric"], row["delta"]),
            "size": format_bytes(row["size_bytes"]),
            "p50 latency": f"{row['latency_p50_ms']:.3f} ms{batch}" if timed else "-",
            "speed-up": f"{row['speedup_vs_baseline']:.2f}×" if timed else "-",
            "verdict": row["status"],
        })
    return table


def stage_markdown(stage: dict[str, Any]) -> str:
    """A task run's result as the Prefect UI shows it: state, time, artifact folder, headline figures or the reason."""
    lines = [f"### {stage['name']} ({stage['uses']}): {stage['state']}"]
    if stage.get("seconds"):
        waited = stage.get("waited_seconds") or 0.0
        lines.append(f"{stage['seconds']:.2f} s" + (f", after waiting {waited:.2f} s for the torch lock" if waited >= 0.01 else ""))
    if stage.get("artifact"):
        lines.append(f"artifact `{stage['artifact']}`")
    if stage.get("reason"):
        lines.append(f"reason: {stage['reason']}")
    lines += [f"- {label}: {value}" for label, value in stage_highlights(stage)]
    return "\n\n".join(lines) + "\n"
