"""Building, loading and running the frozen teacher detector."""
import logging
import os
from typing import Dict, List
from urllib.parse import urlparse

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import ImageList
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import get_cache_dir

from .checkpoint import FGDCheckpointer
from .data import apply_coco_folder
from .detectors import build_detector
from .errors import ConfigError, brief

__all__ = ["build_teacher", "load_teacher_config", "teacher_weights_path", "TeacherFeatureExtractor"]

logger = logging.getLogger(__name__)

_DETECTRON2_PREFIX = "detectron2://"
_DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2/"


def _is_model_zoo_config(config_file: str) -> bool:
    return not os.path.isfile(config_file)


def load_teacher_config(cfg: CfgNode) -> CfgNode:
    """
    The teacher's config: ``MODEL.FGD.TEACHER.CONFIG_FILE`` (a file path, else a model-zoo path) merged with
    ``MODEL.FGD.TEACHER.OPTS``, on the student's ``MODEL.DEVICE``.
    """
    from .config import add_fgd_config

    config_file = cfg.MODEL.FGD.TEACHER.CONFIG_FILE
    if not config_file:
        raise ConfigError(
            "MODEL.FGD.TEACHER.CONFIG_FILE is empty: set it to a model-zoo config "
            "(e.g. COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml) or to a config file path"
        )
    path = config_file
    if _is_model_zoo_config(config_file):
        try:
            path = model_zoo.get_config_file(config_file)
        except RuntimeError:
            raise ConfigError(
                f"MODEL.FGD.TEACHER.CONFIG_FILE={config_file!r} is neither an existing file (relative paths are "
                f"read from the current directory, {os.getcwd()}) nor a config of Detectron2's model zoo; fix the path"
            ) from None
    teacher_cfg = get_cfg()
    add_fgd_config(teacher_cfg)
    try:
        teacher_cfg.merge_from_file(path)
        teacher_cfg.merge_from_list(list(cfg.MODEL.FGD.TEACHER.OPTS))
    except Exception as e:  # yacs raises several types for bad files and keys
        raise ConfigError(
            f"cannot read the teacher config MODEL.FGD.TEACHER.CONFIG_FILE={config_file!r} with "
            f"MODEL.FGD.TEACHER.OPTS={list(cfg.MODEL.FGD.TEACHER.OPTS)}: {brief(e)}"
        ) from e
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if not teacher_cfg.DATASETS.COCO_FOLDER:  # the teacher knows the student's classes
        teacher_cfg.DATASETS.COCO_FOLDER = cfg.DATASETS.COCO_FOLDER
    apply_coco_folder(teacher_cfg)
    return teacher_cfg


def teacher_weights_path(cfg: CfgNode) -> str:
    """``MODEL.FGD.TEACHER.WEIGHTS``, or the model zoo's trained weights of a model-zoo teacher config."""
    weights = cfg.MODEL.FGD.TEACHER.WEIGHTS
    if weights:
        return weights
    config_file = cfg.MODEL.FGD.TEACHER.CONFIG_FILE
    if _is_model_zoo_config(config_file):
        try:
            return model_zoo.get_checkpoint_url(config_file)
        except RuntimeError:
            pass
    raise ConfigError(
        f"MODEL.FGD.TEACHER.WEIGHTS is empty and {config_file!r} has no trained weights in Detectron2's model "
        "zoo: set MODEL.FGD.TEACHER.WEIGHTS to the teacher's checkpoint"
    )


def _cache_path(url: str) -> str:
    """Where Detectron2 (iopath) caches a downloaded URL; pre-seeding this file makes loading work offline."""
    if url.startswith(_DETECTRON2_PREFIX):
        url = _DETECTRON2_URL + url[len(_DETECTRON2_PREFIX):]
    return os.path.join(get_cache_dir(), urlparse(url).path.lstrip("/"))


def _local_weights_file(weights: str) -> str:
    is_url = weights.startswith((_DETECTRON2_PREFIX, "http://", "https://"))
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:
        if not is_url:
            raise
        raise ConfigError(
            f"cannot fetch the teacher weights MODEL.FGD.TEACHER.WEIGHTS={weights!r} ({brief(e)}). "
            f"Offline, set MODEL.FGD.TEACHER.WEIGHTS to a local file, or pre-seed the download cache with the "
            f"file at {_cache_path(weights)} (the cache root is $FVCORE_CACHE, else ~/.torch/iopath_cache)"
        ) from e
    if not os.path.isfile(local):
        raise ConfigError(f"teacher weights MODEL.FGD.TEACHER.WEIGHTS={weights!r}: no such file")
    return local


def build_teacher(cfg: CfgNode):
    """
    Build the full teacher detector from its own config, load its weights and freeze it.

    Returns:
        (teacher, teacher_cfg, loaded_keys): the model in eval mode with ``requires_grad=False`` on the
        student's device, its config, and the set of state-dict keys the checkpoint provided.

    Raises:
        ConfigError: when the config or weights cannot be read, or when the checkpoint does not cover every
            parameter of the teacher's backbone and FPN.
    """
    teacher_cfg = load_teacher_config(cfg)
    weights = teacher_weights_path(cfg)
    local = _local_weights_file(weights)
    teacher = build_detector(teacher_cfg, "teacher", "MODEL.META_ARCHITECTURE of MODEL.FGD.TEACHER.CONFIG_FILE")

    checkpointer = FGDCheckpointer(teacher, weights_key="MODEL.FGD.TEACHER.WEIGHTS")
    try:
        checkpointer.load(local)
    except ConfigError:
        raise
    except Exception as e:  # anything else the checkpoint's content trips in loading
        raise ConfigError(
            f"cannot load the teacher weights MODEL.FGD.TEACHER.WEIGHTS={weights!r}: {brief(e)}"
        ) from e
    state_keys = set(teacher.state_dict().keys())
    incompatible = checkpointer.last_incompatible
    missing = set(incompatible.missing_keys)
    mismatched = {key for key, _, _ in incompatible.incorrect_shapes}
    not_loaded = missing | mismatched
    backbone_not_loaded = sorted(k for k in not_loaded if k.startswith("backbone."))
    if backbone_not_loaded:
        shown = ", ".join(backbone_not_loaded[:8]) + (" ..." if len(backbone_not_loaded) > 8 else "")
        raise ConfigError(
            f"the teacher weights MODEL.FGD.TEACHER.WEIGHTS={weights!r} do not cover the teacher's backbone/FPN "
            f"({len(backbone_not_loaded)} of its tensors are missing or have another shape: {shown}). Check that "
            f"MODEL.FGD.TEACHER.WEIGHTS matches MODEL.FGD.TEACHER.CONFIG_FILE and MODEL.FGD.TEACHER.OPTS"
        )
    if not_loaded:
        logger.warning(
            "Teacher weights do not cover %d tensors outside the backbone (not used by FGD; they matter only for "
            "MODEL.FGD.INHERIT_TEACHER): %s", len(not_loaded), ", ".join(sorted(not_loaded)[:8])
        )
    teacher.eval()
    teacher.requires_grad_(False)
    logger.info("Teacher %s loaded from %s", teacher_cfg.MODEL.META_ARCHITECTURE, weights)
    return teacher, teacher_cfg, state_keys - not_loaded


class TeacherFeatureExtractor:
    """
    Runs only the teacher's backbone + FPN on the student's batch, under ``torch.no_grad()``.

    The teacher normalises the raw images with its own ``PIXEL_MEAN`` / ``PIXEL_STD`` and ``INPUT.FORMAT`` and the
    batch is padded with the student's size divisibility, so the FPN levels of both models line up.
    """

    def __init__(self, teacher, teacher_format: str, student_format: str, size_divisibility: int,
                 padding_constraints: Dict[str, int]):
        formats = {"BGR", "RGB"}
        for key, fmt in (("MODEL.FGD.TEACHER (INPUT.FORMAT)", teacher_format), ("INPUT.FORMAT", student_format)):
            if fmt not in formats:
                raise ConfigError(f"{key}={fmt!r}: FGD supports the image formats {sorted(formats)}")
        self.teacher = teacher
        self.flip_channels = teacher_format != student_format
        self.size_divisibility = size_divisibility
        self.padding_constraints = padding_constraints

    @torch.no_grad()
    def __call__(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """batched_inputs: Detectron2's list of dicts with "image" (C, H, W) in the student's INPUT.FORMAT."""
        teacher = self.teacher
        images = [x["image"].to(teacher.pixel_mean.device, non_blocking=True) for x in batched_inputs]
        if self.flip_channels:
            images = [x.flip(0) for x in images]
        images = [(x - teacher.pixel_mean) / teacher.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility, padding_constraints=self.padding_constraints)
        return teacher.backbone(images.tensor)
