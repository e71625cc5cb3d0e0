"""The attention figure of the pipeline: spatial and channel attention of several detectors on one image."""
import math
from typing import List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from .loss import attention_maps  # noqa: E402

__all__ = ["attention_figure"]


def _features_and_detections(cfg: CfgNode, image_bgr, level: str):
    """Run a plain Detectron2 detector on one BGR image; returns (feature (C, h, w) of the image's cells, instances)."""
    predictor = DefaultPredictor(cfg)
    captured = {}
    handle = predictor.model.backbone.register_forward_hook(lambda module, inputs, outputs: captured.update(outputs))
    try:
        instances = predictor(image_bgr)["instances"].to("cpu")
    finally:
        handle.remove()
    if level not in captured:
        raise KeyError(f"level {level!r} not among the backbone outputs {sorted(captured)}")
    # Crop the padding that the batch adds (size_divisibility): only the image's own cells are shown.
    resized_h, resized_w = predictor.aug.get_transform(image_bgr).apply_image(image_bgr).shape[:2]
    stride = predictor.model.backbone.output_shape()[level].stride
    feature = captured[level][0, :, : math.ceil(resized_h / stride), : math.ceil(resized_w / stride)]
    return feature.float(), instances


def attention_figure(models: Sequence[Tuple[str, CfgNode]], level: str, temperature: float, image_path: str,
                     path: str, score_threshold: float = 0.5) -> None:
    """
    Write a PNG with one row per model: the image with its detections, the spatial attention of FPN ``level``
    (cells, H*W times a softmax over the map at ``temperature``) and its channel attention (C times a softmax).

    Args:
        models: (label, config) pairs; each config is a plain Detectron2 detector config with ``MODEL.WEIGHTS`` set
            and ``DATASETS.TEST[0]`` naming a registered dataset (for class names).
    """
    image = read_image(image_path, format="BGR")
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.4 * len(models)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1.3, 1.3, 1.6]))
    channel_axes: List = []
    for row, (label, cfg) in enumerate(models):
        feature, instances = _features_and_detections(cfg, image, level)
        with torch.no_grad():
            spatial, channel = attention_maps(feature[None], temperature)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        shown = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(
            instances[instances.scores >= score_threshold]
        )
        axes[row, 0].imshow(shown.get_image())
        axes[row, 0].set_title(f"{label}: detections (score >= {score_threshold})", fontsize=9)
        im = axes[row, 1].imshow(spatial[0].numpy(), cmap="jet")
        axes[row, 1].set_title(f"{label}: spatial attention, {level} (T={temperature})", fontsize=9)
        fig.colorbar(im, ax=axes[row, 1], fraction=0.046, pad=0.04)
        axes[row, 2].bar(range(channel.shape[1]), channel[0].numpy(), width=1.0)
        axes[row, 2].set_title(f"{label}: channel attention, {level}", fontsize=9)
        axes[row, 2].set_xlabel("channel")
        channel_axes.append(axes[row, 2])
        for ax in axes[row, :2]:
            ax.axis("off")
    top = max(ax.get_ylim()[1] for ax in channel_axes)
    for ax in channel_axes:
        ax.set_ylim(0, top)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
