"""Nightly re-optimization: checkpoint choice, verdicts and promotion, Prefect schedules."""
