"""``FGDDistiller``: the meta-architecture that trains a student detector with FGD from a frozen teacher."""
import logging
import math
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from .config import DEFAULT_LEVELS, FGD_PRESETS
from .detectors import build_detector
from .errors import ConfigError
from .loss import FEATURE_MASKS, FGDLoss
from .masks import BOX_SCALING_MODES
from .relation import RELATION_MODULES
from .teacher import TeacherFeatureExtractor, build_teacher

__all__ = ["FGDDistiller", "build_student", "resolve_loss_params"]

logger = logging.getLogger(__name__)


def build_student(cfg: CfgNode) -> nn.Module:
    """The student detector: this config with ``MODEL.META_ARCHITECTURE = MODEL.FGD.STUDENT_META_ARCHITECTURE``."""
    arch = cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE
    if arch == "FGDDistiller" or arch not in META_ARCH_REGISTRY:
        raise ConfigError(
            f"MODEL.FGD.STUDENT_META_ARCHITECTURE={arch!r} is not a registered detector meta-architecture; "
            f"use one of {sorted(FGD_PRESETS)}"
        )
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.META_ARCHITECTURE = arch
    return build_detector(student_cfg, "student", "MODEL.FGD.STUDENT_META_ARCHITECTURE")


def resolve_loss_params(cfg: CfgNode) -> Dict[str, object]:
    """
    Loss hyper-parameters in use: explicit ``MODEL.FGD.*`` values, else the preset of the student family.

    Returns keyword arguments of ``FGDLoss`` except the channel counts.
    """
    fgd = cfg.MODEL.FGD
    preset = FGD_PRESETS.get(fgd.STUDENT_META_ARCHITECTURE, {})
    params = {}
    for key, arg in (("TEMPERATURE", "temperature"), ("ALPHA", "alpha"), ("BETA", "beta"), ("GAMMA", "gamma"),
                     ("LAMBDA", "lambda_")):
        value = fgd[key]
        if value is None:
            if key not in preset:
                raise ConfigError(
                    f"MODEL.FGD.{key} is unset and student family {fgd.STUDENT_META_ARCHITECTURE!r} has no preset; "
                    f"set MODEL.FGD.{key}"
                )
            value = preset[key]
        try:
            value = float(value)  # YAML reads "1e-3" (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"MODEL.FGD.{key}={value!r} is not a number") from None
        if key == "TEMPERATURE" and not 0 < value < math.inf:
            raise ConfigError(f"MODEL.FGD.TEMPERATURE must be a finite number > 0, got {value}")
        if key != "TEMPERATURE" and not 0 <= value < math.inf:
            raise ConfigError(f"MODEL.FGD.{key} is a loss weight and must be a finite number >= 0, got {value}")
        params[arg] = value
    if fgd.BOX_SCALING not in BOX_SCALING_MODES:
        raise ConfigError(f"MODEL.FGD.BOX_SCALING={fgd.BOX_SCALING!r}: use one of {list(BOX_SCALING_MODES)}")
    params["box_scaling"] = fgd.BOX_SCALING
    for key, allowed in (("FEATURE_MASK", FEATURE_MASKS), ("RELATION", tuple(RELATION_MODULES))):
        if fgd[key] not in allowed:
            raise ConfigError(f"MODEL.FGD.{key}={fgd[key]!r}: use one of {list(allowed)}")
    for key in ("FOCAL_LOSS", "GLOBAL_LOSS", "SPATIAL_ATTENTION", "CHANNEL_ATTENTION"):
        if not isinstance(fgd[key], bool):
            raise ConfigError(f"MODEL.FGD.{key}={fgd[key]!r}: use True or False")
    if not (fgd.FOCAL_LOSS or fgd.GLOBAL_LOSS):
        raise ConfigError("MODEL.FGD.FOCAL_LOSS and MODEL.FGD.GLOBAL_LOSS are both False: nothing to distil")
    params.update(feature_mask=fgd.FEATURE_MASK, focal_loss=fgd.FOCAL_LOSS, global_loss=fgd.GLOBAL_LOSS,
                  spatial_attention=fgd.SPATIAL_ATTENTION, channel_attention=fgd.CHANNEL_ATTENTION,
                  relation=fgd.RELATION)
    return params


def _resolve_levels(cfg: CfgNode, student_shapes, teacher_shapes) -> List[str]:
    """FPN levels to distil, checked to exist in both models with the same stride."""
    arch = cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE
    requested = list(cfg.MODEL.FGD.IN_FEATURES)
    if requested:
        levels = requested
    else:
        defaults = DEFAULT_LEVELS.get(arch)
        if defaults is None:
            raise ConfigError(f"student family {arch!r} has no default FPN levels: set MODEL.FGD.IN_FEATURES")
        levels = [level for level in defaults if level in teacher_shapes]
        if not levels:
            raise ConfigError(
                f"the teacher produces none of the default levels {defaults} of a {arch} student (teacher "
                f"levels: {sorted(teacher_shapes)}); set MODEL.FGD.IN_FEATURES"
            )
        logger.info("MODEL.FGD.IN_FEATURES is empty: distilling %s (the %s defaults the teacher has)", levels, arch)
    for level in levels:
        for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            if level not in shapes:
                hint = " (FGD distils FPN levels: use an FPN backbone)" if not any(
                    k.startswith("p") for k in shapes) else ""
                raise ConfigError(
                    f"MODEL.FGD.IN_FEATURES: level {level!r} does not exist in the {side}'s backbone, whose "
                    f"outputs are {sorted(shapes)}{hint}"
                )
        if student_shapes[level].stride != teacher_shapes[level].stride:
            raise ConfigError(
                f"FPN level {level!r} has stride {student_shapes[level].stride} in the student but "
                f"{teacher_shapes[level].stride} in the teacher; distil levels of equal stride (MODEL.FGD.IN_FEATURES)"
            )
    return levels


@META_ARCH_REGISTRY.register()
class FGDDistiller(nn.Module):
    """
    A student detector trained with FGD losses from a frozen teacher.

    * ``self.student``: the student, built from this config with ``MODEL.FGD.STUDENT_META_ARCHITECTURE``. Its
      FPN outputs are captured by a forward hook on its backbone during its own, unmodified forward.
    * ``self.teacher``: the full teacher detector (frozen, always in eval mode). It is deliberately not a registered
      submodule, so it is not in ``state_dict()``, ``parameters()`` or the optimizer, and ``.train()`` does not
      reach it.
    * ``self.distill_losses``: one ``FGDLoss`` per distilled level (trainable: align convs and relation blocks).

    Training forward returns the student's losses plus ``loss_fgd_fg``, ``loss_fgd_bg``, ``loss_fgd_at`` and
    ``loss_fgd_global`` (each term times its weight, summed over levels). Eval forward returns the student's
    detections.
    """

    def __init__(self, cfg: CfgNode, *, with_teacher: bool = True):
        """
        Args:
            cfg: a config with ``MODEL.FGD`` keys (``add_fgd_config``).
            with_teacher: build and load the teacher and the loss modules. False gives a student-only model for
                evaluation, which loads the same checkpoints.
        """
        super().__init__()
        self.student = build_student(cfg)
        self._student_features: Optional[Dict[str, torch.Tensor]] = None
        self._student_input_size = None
        self.student.backbone.register_forward_hook(self._capture_student_features)
        self.in_features: List[str] = []
        self.distill_losses = nn.ModuleDict()
        object.__setattr__(self, "teacher", None)
        if not with_teacher:
            return

        loss_params = resolve_loss_params(cfg)
        teacher, teacher_cfg, teacher_loaded_keys = build_teacher(cfg)
        object.__setattr__(self, "teacher", teacher)
        self.teacher_loaded_keys = teacher_loaded_keys
        student_shapes = self.student.backbone.output_shape()
        teacher_shapes = teacher.backbone.output_shape()
        self.in_features = _resolve_levels(cfg, student_shapes, teacher_shapes)
        self.teacher_features = TeacherFeatureExtractor(
            teacher,
            teacher_format=teacher_cfg.INPUT.FORMAT,
            student_format=cfg.INPUT.FORMAT,
            size_divisibility=self.student.backbone.size_divisibility,
            padding_constraints=self.student.backbone.padding_constraints,
        )
        for level in self.in_features:
            self.distill_losses[level] = FGDLoss(
                student_channels=student_shapes[level].channels,
                teacher_channels=teacher_shapes[level].channels,
                **loss_params,
            )
        self.distill_losses.to(torch.device(cfg.MODEL.DEVICE))
        logger.info("FGD on levels %s with %s", self.in_features,
                    ", ".join(f"{k}={v}" for k, v in loss_params.items()))

    @property
    def device(self):
        return self.student.device

    def _capture_student_features(self, module, inputs, outputs):
        if self.training:
            self._student_features = outputs
            self._student_input_size = tuple(inputs[0].shape[-2:])

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts; in training each has "image" (C, H, W) and "instances"
                with ``gt_boxes`` in pixels of the resized image.
        """
        if not self.training:
            return self.student(batched_inputs)
        if self.teacher is None:
            raise RuntimeError("this FGDDistiller was built without a teacher (with_teacher=False) and cannot train")

        losses = self.student(batched_inputs)
        student_features, input_size = self._student_features, self._student_input_size
        self._student_features = None  # do not keep the graph alive past this step
        teacher_features = self.teacher_features(batched_inputs)
        gt_boxes = [x["instances"].gt_boxes.tensor for x in batched_inputs]
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]

        weighted = {"loss_fgd_fg": 0.0, "loss_fgd_bg": 0.0, "loss_fgd_at": 0.0, "loss_fgd_global": 0.0}
        logged = {}
        for level in self.in_features:
            student_feature, teacher_feature = student_features[level], teacher_features[level]
            if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
                raise ConfigError(
                    f"FPN level {level!r}: student feature {tuple(student_feature.shape)} and teacher feature "
                    f"{tuple(teacher_feature.shape)} differ in spatial size; the two backbones must have the same "
                    "strides on MODEL.FGD.IN_FEATURES"
                )
            loss = self.distill_losses[level]
            terms = loss(student_feature, teacher_feature, gt_boxes, image_sizes, input_size)
            weighted["loss_fgd_fg"] = weighted["loss_fgd_fg"] + loss.alpha * terms["fg"]
            weighted["loss_fgd_bg"] = weighted["loss_fgd_bg"] + loss.beta * terms["bg"]
            weighted["loss_fgd_at"] = weighted["loss_fgd_at"] + loss.gamma * terms["attention"]
            weighted["loss_fgd_global"] = weighted["loss_fgd_global"] + loss.lambda_ * terms["global"]
            for name in ("fg", "bg", "attention", "global"):
                logged[f"fgd/{level}/{name}"] = terms[name].detach()
        self._log_terms(logged)
        losses.update(weighted)
        return losses

    @staticmethod
    def _log_terms(terms: Dict[str, torch.Tensor]) -> None:
        """Per-level unweighted terms to the EventStorage (metrics.json, TensorBoard), with one device sync."""
        try:
            storage = get_event_storage()
        except AssertionError:  # forward called outside a trainer
            return
        values = torch.stack(list(terms.values())).cpu().tolist()
        storage.put_scalars(**dict(zip(terms.keys(), values)), smoothing_hint=True)
