"""
FCOS from YAML configs: Detectron2 ships the FCOS meta-architecture only through its Python (lazy) configs.

Importing this module registers the meta-architecture ``"FCOS"`` (``MODEL.FCOS.*`` keys, see ``add_fgd_config``)
and the backbone ``"build_fcos_resnet_fpn_backbone"`` (a ResNet FPN whose P6 and P7 are computed from P5, as in
Detectron2's lazy FCOS config and the FCOS paper's Sec. 2.2).
"""
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch import fcos

__all__ = ["FCOS", "build_fcos_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN (``MODEL.FPN.*``) with P6 = conv(P5) and P7 = conv(ReLU(P6)), strides 8-128 for res3-res5."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@META_ARCH_REGISTRY.register()
class FCOS(fcos.FCOS):
    """Detectron2's ``FCOS``, built from a YAML config (``MODEL.FCOS.*``, ``MODEL.BACKBONE``, ``MODEL.FPN``)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        head_shapes = [shapes[f] for f in cfg.MODEL.FCOS.IN_FEATURES]
        head = fcos.FCOSHead(
            input_shape=head_shapes,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            conv_dims=[head_shapes[0].channels] * cfg.MODEL.FCOS.NUM_CONVS,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
            norm=cfg.MODEL.FCOS.NORM,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": cfg.MODEL.FCOS.IN_FEATURES,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            "test_score_thresh": cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.FCOS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
