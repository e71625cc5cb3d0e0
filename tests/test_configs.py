"""Every shipped config loads and builds (the teacher swapped for a tiny local one: no network)."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import tiny
from fgd_d2 import FGDDistiller, add_fgd_config
from fgd_d2.teacher import load_teacher_config, teacher_weights_path

CONFIGS = sorted(p for p in (tiny.REPO / "configs").rglob("*.yaml") if not p.name.startswith("Base-"))


def load(path):
    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"fgd_faster_rcnn.yaml", "fgd_retinanet.yaml", "fgd_mask_rcnn.yaml", "fgd_fcos.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "configs" and p.name.startswith("fgd_")],
                         ids=lambda p: p.name)
def test_coco_config_reference_settings_and_teacher(path, monkeypatch):
    monkeypatch.chdir(tiny.REPO)  # configs name their local files relative to the repository root
    cfg = load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "FGDDistiller"
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
    assert cfg.SOLVER.MAX_ITER == 180000  # 2x schedule
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 35.0
    assert cfg.SOLVER.BASE_LR == (0.02 if cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE == "GeneralizedRCNN" else 0.01)
    teacher_cfg = load_teacher_config(cfg)  # resolves the model-zoo config offline
    assert teacher_cfg.MODEL.RESNETS.DEPTH == 101
    if cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE == "FCOS":  # the model zoo has no trained FCOS: a local teacher
        assert teacher_cfg.MODEL.META_ARCHITECTURE == "FCOS"
        assert teacher_weights_path(cfg) == "output/fcos_R_101_FPN_teacher/model_final.pth"
    else:
        assert teacher_weights_path(cfg).startswith("https://dl.fbaipublicfiles.com/detectron2/")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(tiny.REPO / "configs")))
def test_config_builds_with_a_tiny_local_teacher(path, tmp_path):
    cfg = load(path)
    arch = cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE if cfg.MODEL.META_ARCHITECTURE == "FGDDistiller" else None
    if arch is None:  # a plain detector (the CPU pipeline's teachers and students)
        cfg.MODEL.DEVICE = "cpu"
        assert sum(p.numel() for p in build_model(cfg).parameters()) > 0
        return
    config, weights, _ = tiny.write_teacher(tmp_path, arch=arch, fpn_channels=16,
                                            extra=["MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                                   "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES,
                                                   "MODEL.FCOS.NUM_CLASSES", cfg.MODEL.FCOS.NUM_CLASSES])
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.FGD.TEACHER.CONFIG_FILE", config,
                         "MODEL.FGD.TEACHER.WEIGHTS", weights, "MODEL.FGD.TEACHER.OPTS", []])
    model = FGDDistiller(cfg)
    assert model.in_features
    assert all(level in model.distill_losses for level in model.in_features)


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn", "fcos"])
def test_cpu_pipeline_configs(family, tmp_path):
    """The FGD student is the plain student with the same schedule; the teacher is deeper and trains longer."""
    from fgd_d2.pipeline import FAMILIES

    paths = {k: tiny.REPO / v for k, v in FAMILIES[family].items() if k != "level"}
    teacher, student, fgd = (load(paths[k]) for k in ("teacher", "student", "fgd_student"))
    assert fgd.MODEL.META_ARCHITECTURE == "FGDDistiller"
    assert fgd.MODEL.FGD.STUDENT_META_ARCHITECTURE == student.MODEL.META_ARCHITECTURE
    assert tiny.REPO / fgd.MODEL.FGD.TEACHER.CONFIG_FILE == paths["teacher"]
    assert teacher.MODEL.RESNETS.DEPTH > student.MODEL.RESNETS.DEPTH
    assert teacher.SOLVER.MAX_ITER > student.SOLVER.MAX_ITER
    same = fgd.clone()
    same.merge_from_list(["MODEL.META_ARCHITECTURE", student.MODEL.META_ARCHITECTURE,
                          "OUTPUT_DIR", student.OUTPUT_DIR])
    same.MODEL.FGD = student.MODEL.FGD
    assert same.dump() == student.dump()
    # The FGD config builds with the real teacher architecture (random weights: nothing is trained here).
    teacher.MODEL.DEVICE = "cpu"
    weights = tmp_path / "teacher.pth"
    torch.save({"model": build_model(teacher).state_dict()}, weights)
    fgd.merge_from_list(["MODEL.FGD.TEACHER.CONFIG_FILE", str(paths["teacher"]),
                         "MODEL.FGD.TEACHER.WEIGHTS", str(weights)])
    model = FGDDistiller(fgd)
    assert model.in_features == (["p2", "p3", "p4", "p5"] if family == "faster_rcnn" else ["p3", "p4", "p5", "p6", "p7"])
