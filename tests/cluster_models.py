"""Models for the runner tests: the demo CNN with a forward that kills its own process during ONNX export, as a
native crash in an exporter or an out-of-memory kill would."""

from __future__ import annotations

import os
import signal

import torch

from pipeline.zoo import DigitsCNN


class KilledOnExport(DigitsCNN):
    """``DigitsCNN`` (same weights) whose process receives SIGKILL when ``torch.onnx.export`` traces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def killed_on_export() -> KilledOnExport:
    """The factory a recipe names: ``tests.cluster_models:killed_on_export``."""
    return KilledOnExport()
