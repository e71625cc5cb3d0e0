"""
fgd_d2: Focal and Global Knowledge Distillation (FGD, CVPR 2022) for Detectron2 detectors.

Importing the package registers the ``FGDDistiller`` meta-architecture.
"""
from .config import add_fgd_config
from .distiller import FGDDistiller
from .errors import ConfigError
from .loss import FGDLoss
from .masks import focal_masks
from .trainer import FGDTrainer

__all__ = ["add_fgd_config", "ConfigError", "FGDDistiller", "FGDLoss", "FGDTrainer", "focal_masks"]
