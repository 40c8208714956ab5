"""The declared shapes of what optipipe writes to disk: run records, their stage results, manifests.

Producers build these models and dump them to JSON; readers parse JSON back through them, so a field
that is missing or renamed fails loudly where it is read instead of silently reading as absent. Fields
may be added; none may be renamed (README, "contracts scripts rely on"). Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StageState = Literal["done", "cached", "failed", "skipped", "rejected"]
RunState = Literal["running", "succeeded", "failed", "crashed", "cancelled"]
ArtifactKind = Literal["torch", "onnx", "engine", "openvino", "report"]


class Record(BaseModel):
    """Base of the on-disk models: unknown fields written by a newer optipipe are kept, not dropped."""

    model_config = ConfigDict(extra="allow")


class StageResult(Record):
    """What happened to one stage in a run: one entry of the run record's ``stages``."""

    name: str = Field(description="the recipe's name for the stage")
    uses: str = Field(description="the stage implementation")
    state: StageState
    seconds: float = Field(default=0.0, description="time the stage ran, not counting waiting for the torch lock")
    key: str | None = Field(default=None, description="cache key: the artifact folder's name")
    artifact: str | None = Field(default=None, description="path of the artifact folder")
    metrics: dict[str, Any] | None = None
    reason: str | None = Field(default=None, description="why the stage failed, was skipped or rejected")
    waited_seconds: float = Field(default=0.0, description="time spent waiting for the process's torch lock")
    error: Literal["input", "internal"] | None = Field(
        default=None, description="input: a deliberate one-line error about the user's input; internal: a bug (see log)"
    )
    log: str | None = Field(default=None, description="file holding the traceback of an internal error")
    worker: str | None = Field(default=None, description="where the stage ran: a Dask worker's address, else host:pid")


class RecipeRef(Record):
    """Which recipe a run used."""

    name: str
    path: str
    digest: str


class CheckpointRef(Record):
    """Which checkpoint a run optimized."""

    path: str
    sha256: str


class RunRecord(Record):
    """``<store>/runs/<run_id>.json``: one run of a recipe on a checkpoint."""

    run_id: str
    recipe: RecipeRef
    checkpoint: CheckpointRef
    baseline: str | None = None
    dag: dict[str, list[str]] = Field(default_factory=dict, description="stage -> the stages it needs")
    store: str | None = None
    runner: str | None = Field(default=None, description="where the stages ran: threads:N, processes:N or dask://HOST:PORT")
    state: RunState
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    host: str | None = None
    pid: int | None = None
    message: str | None = None
    stages: list[StageResult] = Field(default_factory=list)
    nightly: dict[str, Any] | None = Field(default=None, description="nightly runs: the verdict against the last good night")
    search: dict[str, Any] | None = Field(
        default=None, description="recipes with a matrix: the search limits, the trials tried and not, the stages skipped for the budget"
    )


class Manifest(Record):
    """``<store>/artifacts/<key>/manifest.json``: what an artifact holds and how it was made."""

    key: str
    stage: str
    uses: str
    kind: ArtifactKind
    model: str = Field(description="the main file's name inside the folder")
    files: dict[str, str] = Field(description="file name -> sha256")
    digest: str = Field(description="content digest over files")
    handle: dict[str, Any] = Field(default_factory=dict, description="how to load the model")
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list, description="upstream artifact keys")
    metrics: dict[str, Any] = Field(default_factory=dict)
    seconds: float
    waited_seconds: float = 0.0
    peak_rss_bytes: int
    start_rss_bytes: int | None = Field(default=None, description="the process's resident memory when the stage started")
    versions: dict[str, str]
    cache_payload: dict[str, Any]
    run_id: str
    created_at: str
    worker: str | None = Field(default=None, description="where the stage that made the artifact ran (a Dask worker's address, "
                               "else host:pid)")
