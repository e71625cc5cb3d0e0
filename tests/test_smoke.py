"""Imports, and one training step of tiny model-zoo detectors on the CPU."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tiny


def test_imports():
    import detectron2  # noqa: F401
    import fgd_d2
    from fgd_d2.loss import FGDLoss  # noqa: F401

    assert callable(fgd_d2.add_fgd_config)
    from detectron2.modeling import META_ARCH_REGISTRY
    assert "FGDDistiller" in META_ARCH_REGISTRY and "FCOS" in META_ARCH_REGISTRY


def test_add_fgd_config_defines_the_keys():
    cfg = tiny.detector_cfg()
    fgd = cfg.MODEL.FGD
    assert fgd.STUDENT_META_ARCHITECTURE == "GeneralizedRCNN" and fgd.BOX_SCALING == "padded"
    assert fgd.TEMPERATURE is None and fgd.ALPHA is None and fgd.INHERIT_TEACHER is False
    assert fgd.TEACHER.CONFIG_FILE == "" and list(fgd.TEACHER.OPTS) == [] and list(fgd.IN_FEATURES) == []


@pytest.mark.parametrize("arch", ["RetinaNet", "GeneralizedRCNN", "FCOS"])
def test_one_training_step_of_a_tiny_model_zoo_detector(arch):
    torch.manual_seed(0)
    model = build_model(tiny.detector_cfg(arch))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage():
        losses = model(tiny.make_batch())
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert losses and all(torch.isfinite(v) for v in losses.values())
