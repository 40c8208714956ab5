"""Running a plan: the stage contract, the registry of stages, cache identity and the executor."""
