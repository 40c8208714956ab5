"""Stages run in concurrent threads: graph capture in one must not break torch forwards in another."""

from __future__ import annotations

import threading

import numpy as np

from pipeline.data import build_data
from pipeline.models import TorchRunner, save_torch_module
from pipeline.stage import StageContext
from pipeline.zoo import resnet_small
from tests.conftest import one_stage_recipe
from stages import fuse_conv_bn

RECIPE = one_stage_recipe("pipeline.zoo:resnet_small")


def test_fx_fusion_in_one_thread_while_another_runs_forwards(tmp_path):
    data = build_data(RECIPE.data, [1, 1, 8, 8])
    source = tmp_path / "source"
    source.mkdir()
    handle = save_torch_module(resnet_small().eval(), source)
    runner = TorchRunner(resnet_small().eval())
    batch = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    errors: list[BaseException] = []
    fusing = threading.Event()

    def fuse_repeatedly() -> None:
        fusing.set()
        try:
            for index in range(8):
                workdir = tmp_path / f"work{index}"
                workdir.mkdir()
                context = StageContext(name="fused", workdir=workdir, recipe=RECIPE, checkpoint_path=None, load_data=lambda: data)
                fuse_conv_bn.run(context, [handle], fuse_conv_bn.Params())
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)

    thread = threading.Thread(target=fuse_repeatedly)
    thread.start()
    fusing.wait()
    while thread.is_alive():
        try:
            runner.predict(batch)
        except BaseException as error:
            errors.append(error)
            break
    thread.join()
    assert errors == []
