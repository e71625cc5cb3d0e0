"""
fgd_d2: Focal and Global Knowledge Distillation (FGD, CVPR 2022) for Detectron2 detectors.

Importing the package registers the ``FGDDistiller`` and ``FCOS`` meta-architectures and the
``build_fcos_resnet_fpn_backbone`` backbone.
"""
from .config import add_fgd_config
from .distiller import FGDDistiller
from .fcos import FCOS
from .errors import ConfigError
from .loss import FGDLoss
from .masks import focal_masks
from .trainer import FGDTrainer

__all__ = ["add_fgd_config", "ConfigError", "FCOS", "FGDDistiller", "FGDLoss", "FGDTrainer", "focal_masks"]
