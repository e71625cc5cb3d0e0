"""Config keys of fgd_d2 (``add_fgd_config``) and the reference presets of the FGD loss."""
from detectron2.config import CfgNode as CN

__all__ = ["add_fgd_config", "FGD_PRESETS", "DEFAULT_LEVELS"]

# Reference presets per student meta-architecture: temperature and the weights alpha, beta, gamma, lambda
# (FGD_SPEC.md, "Levels and presets").
FGD_PRESETS = {
    "GeneralizedRCNN": dict(TEMPERATURE=0.5, ALPHA=5e-5, BETA=2.5e-5, GAMMA=5e-5, LAMBDA=5e-7),
    "RetinaNet": dict(TEMPERATURE=0.5, ALPHA=1e-3, BETA=5e-4, GAMMA=5e-4, LAMBDA=5e-6),
    "FCOS": dict(TEMPERATURE=0.8, ALPHA=1.6e-3, BETA=8e-4, GAMMA=8e-4, LAMBDA=8e-6),
}

# FPN levels distilled by default per student meta-architecture.
DEFAULT_LEVELS = {
    "GeneralizedRCNN": ["p2", "p3", "p4", "p5"],
    "RetinaNet": ["p3", "p4", "p5", "p6", "p7"],
    "FCOS": ["p3", "p4", "p5", "p6", "p7"],
}


def add_fgd_config(cfg):
    """
    Add fgd_d2's keys to a Detectron2 config: ``MODEL.FGD.*``, ``MODEL.FCOS.*`` (the YAML-built ``FCOS``
    meta-architecture) and ``DATASETS.COCO_FOLDER``. fgd_d2's trainer also accepts
    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`` (clip the total norm over all trainable parameters).
    """
    cfg.MODEL.FGD = CN()
    # Meta-architecture of the student; the student is the rest of this config.
    cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"

    cfg.MODEL.FGD.TEACHER = CN()
    # A model-zoo config path ("COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml") or a path to a config file.
    cfg.MODEL.FGD.TEACHER.CONFIG_FILE = ""
    # Local path, detectron2:// or https URL. Empty: the model zoo's trained weights of a model-zoo CONFIG_FILE.
    cfg.MODEL.FGD.TEACHER.WEIGHTS = ""
    # KEY VALUE overrides applied to the teacher config, e.g. ["MODEL.ROI_HEADS.NUM_CLASSES", 3].
    cfg.MODEL.FGD.TEACHER.OPTS = []

    # FPN levels to distil. Empty: the student family's default levels (DEFAULT_LEVELS) that the teacher has.
    cfg.MODEL.FGD.IN_FEATURES = []
    # Loss hyper-parameters. None: the reference preset of the student family (FGD_PRESETS).
    cfg.MODEL.FGD.TEMPERATURE = None
    cfg.MODEL.FGD.ALPHA = None
    cfg.MODEL.FGD.BETA = None
    cfg.MODEL.FGD.GAMMA = None
    cfg.MODEL.FGD.LAMBDA = None
    # How boxes map to feature cells: "padded" (the padded batch size) or "image" (each image's own size, as the
    # reference code does).
    cfg.MODEL.FGD.BOX_SCALING = "padded"
    # Inheriting strategy: after MODEL.WEIGHTS is loaded (never on resume), copy every teacher weight outside
    # backbone.bottom_up.* whose shape matches into the student.
    cfg.MODEL.FGD.INHERIT_TEACHER = False

    # Ablation switches (the paper's Tables 1, 4, 5, 6); the defaults are the method.
    # Masks of the feature loss: "split" (foreground and background weighted apart), "foreground" or "background"
    # (that term only), "uniform" (no split: one mask 1/(H*W) over the whole map, weighted by ALPHA).
    cfg.MODEL.FGD.FEATURE_MASK = "split"
    # The focal terms (foreground, background, attention) and the global term.
    cfg.MODEL.FGD.FOCAL_LOSS = True
    cfg.MODEL.FGD.GLOBAL_LOSS = True
    # The teacher's spatial / channel attention; off: weight 1 in the feature loss, that half of the attention
    # loss dropped.
    cfg.MODEL.FGD.SPATIAL_ATTENTION = True
    cfg.MODEL.FGD.CHANNEL_ATTENTION = True
    # Relation module of the global loss: "GcBlock" or "NonLocal".
    cfg.MODEL.FGD.RELATION = "GcBlock"

    # A COCO-format folder (images/, annotations/instances_{train,val}.json). When set, its splits are registered
    # and used as DATASETS.TRAIN / DATASETS.TEST, and NUM_CLASSES is read from the json.
    cfg.DATASETS.COCO_FOLDER = ""

    # FCOS built from YAML (fgd_d2.fcos): MODEL.META_ARCHITECTURE "FCOS" with MODEL.BACKBONE.NAME
    # "build_fcos_resnet_fpn_backbone". Defaults are those of Detectron2's lazy FCOS config.
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4
    cfg.MODEL.FCOS.NORM = "GN"
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Radius, in units of the level's stride, of the box centre region whose points are positives.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6
