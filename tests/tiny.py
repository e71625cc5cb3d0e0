"""Tiny Detectron2 models, configs, checkpoints and batches for CPU tests."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from fgd_d2 import add_fgd_config

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "data" / "bccd"

ZOO_CONFIGS = {
    "RetinaNet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "GeneralizedRCNN": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "GeneralizedRCNN-C4": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",  # no FPN
    "FCOS": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",  # + FCOS_OPTS: the model zoo has FCOS only as lazy config
}

FCOS_OPTS = ["MODEL.META_ARCHITECTURE", "FCOS", "MODEL.BACKBONE.NAME", "build_fcos_resnet_fpn_backbone",
             "MODEL.FCOS.NUM_CLASSES", 3, "MODEL.FCOS.NUM_CONVS", 1, "MODEL.FCOS.NORM", ""]

COMMON = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.PIXEL_STD", [57.375, 57.120, 58.395],
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.STEM_OUT_CHANNELS", 32,
    "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.RETINANET.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 64, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.001, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0, "SOLVER.WARMUP_ITERS", 0, "SOLVER.MAX_ITER", 4,
    "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "TEST.DETECTIONS_PER_IMAGE", 20,
]


def detector_cfg(arch="RetinaNet", fpn_channels=16, extra=()):
    """A tiny R-18 FPN detector config from a model-zoo config, on the CPU."""
    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(ZOO_CONFIGS[arch]))
    cfg.merge_from_list(COMMON + ["MODEL.FPN.OUT_CHANNELS", fpn_channels] + (FCOS_OPTS if arch == "FCOS" else [])
                        + list(extra))
    return cfg


def write_teacher(tmp_path, arch="RetinaNet", fpn_channels=24, extra=(), seed=0, name="teacher"):
    """Write a tiny teacher config (YAML) and a checkpoint of it; returns (config_path, weights_path, model)."""
    cfg = detector_cfg(arch, fpn_channels, extra)
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Non-trivial normalisation layers and biases, so copies and mix-ups are visible.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(cfg.dump())
    weights_path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict()}, weights_path)
    return str(config_path), str(weights_path), model


def distiller_cfg(teacher_config, teacher_weights, arch="RetinaNet", fpn_channels=16, extra=()):
    cfg = detector_cfg(arch, fpn_channels)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "FGDDistiller", "MODEL.FGD.STUDENT_META_ARCHITECTURE", arch,
        "MODEL.FGD.TEACHER.CONFIG_FILE", teacher_config, "MODEL.FGD.TEACHER.WEIGHTS", teacher_weights,
    ] + list(extra))
    return cfg


def make_batch(sizes=((64, 96), (80, 64)), seed=0, boxes_per_image=3):
    """Detectron2 training inputs: uint8-range images (3, h, w) and random boxes in pixels."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        xy = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 6 + torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 3, (boxes_per_image,), generator=g)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def run_script(args, cwd=REPO, timeout=900, env=None):
    """Run a Python script of the repository in a fresh interpreter; returns the completed process."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([sys.executable] + [str(a) for a in args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
