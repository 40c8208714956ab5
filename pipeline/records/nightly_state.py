"""The declared shape of ``<store>/nightly/<recipe>.json``: a recipe's nightly history and its promoted ``latest``.

``pipeline.nightly.promotion`` reads and writes the file only through these models. Fields may be added;
none may be renamed (deployers read ``latest``). Torch-free.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.records.models import Record, RunState


class NightEntry(Record):
    """One nightly run of the recipe and its verdict against the last good night."""

    run_id: str
    checkpoint: str = Field(description="path of the checkpoint the night optimized")
    choice: str = Field(description="why that checkpoint was taken as the newest")
    state: RunState = Field(description="the run's state when the night was recorded")
    reference_run: str | None = Field(description="the last good night it was compared with; null on the first night")
    regressions: list[str] = Field(description="one line per regression against reference_run")
    promoted: bool = Field(description="whether this night became latest")
    at: str = Field(description="when the night was recorded (UTC, ISO 8601)")


class LatestEntry(Record):
    """The newest nightly run that succeeded without regressions: what deployers fetch."""

    run_id: str
    checkpoint: str = Field(description="path of the checkpoint the run optimized")
    promoted_at: str = Field(description="when it was promoted (UTC, ISO 8601)")
    variants: dict[str, str] = Field(description="stage name -> the model file of its artifact (on the machine that promoted it)")
    keys: dict[str, str] = Field(default_factory=dict, description="stage name -> its artifact key: `optipipe latest` finds the "
                                 "model through the store by it, on any machine")
    chosen: str | None = Field(default=None, description="the variant the run's select stage chose: what `optipipe latest` gives by default")


class NightlyState(Record):
    """``<store>/nightly/<recipe>.json``: every nightly run of one recipe and its current ``latest``."""

    recipe: str = Field(description="the recipe's name")
    runs: list[NightEntry] = Field(default_factory=list, description="every night, oldest first")
    latest: LatestEntry | None = Field(default=None, description="null until a night succeeds without regressions")
