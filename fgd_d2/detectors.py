"""Building the student and teacher detectors from their configs, with construction mistakes explained."""
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from .errors import ConfigError

__all__ = ["build_detector"]


def build_detector(cfg: CfgNode, role: str, arch_key: str) -> nn.Module:
    """
    ``MODEL.META_ARCHITECTURE`` of ``cfg`` built on ``MODEL.DEVICE``.

    Detectron2's heads look their input features up by name, so a config whose heads read a feature its backbone
    does not produce (no FPN, or a meta-architecture that does not match the rest of the config) fails with a bare
    ``KeyError``; that becomes a ``ConfigError`` naming the backbone's outputs and the keys to check.

    Args:
        role: "student" or "teacher", for messages.
        arch_key: the config key that chose the meta-architecture, for messages.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in META_ARCH_REGISTRY:
        raise ConfigError(f"{arch_key}={arch!r} of the {role} is not a registered Detectron2 meta-architecture")
    try:
        model = META_ARCH_REGISTRY.get(arch)(cfg)
    except KeyError as e:
        feature = e.args[0] if e.args else None
        if not isinstance(feature, str):
            raise
        try:
            outputs = sorted(build_backbone(cfg).output_shape())
        except Exception:  # the backbone itself is broken: let the original error speak
            raise e from None
        if feature in outputs:
            raise
        raise ConfigError(
            f"the {role} ({arch}) cannot be built: its heads read the feature {feature!r}, which its backbone "
            f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} does not produce (outputs: {outputs}). Check that "
            f"{arch_key}={arch!r} is the detector the config describes and that the heads' IN_FEATURES name "
            "backbone outputs; FGD distils FPN levels, so the backbone must be an FPN"
        ) from None
    return model.to(cfg.MODEL.DEVICE)
