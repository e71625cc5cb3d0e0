"""
The FGD loss of one FPN level: focal (foreground / background), attention and global terms.

Pure torch; knows nothing about Detectron2. ``FGD_SPEC.md`` is the numerical contract.
"""
import math
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from .masks import BOX_SCALING_MODES, focal_masks
from .relation import RELATION_MODULES

__all__ = ["FEATURE_MASKS", "FGDLoss", "attention_maps"]

# Masks of the focal feature loss (the paper's Table 1): "split" weights foreground and background separately
# (the method), "foreground" / "background" keep one of the two terms, "uniform" puts one mask 1/(H*W) over the
# whole map (no split) into the "fg" term, weighted by alpha.
FEATURE_MASKS = ("split", "foreground", "background", "uniform")


def attention_maps(feature: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Spatial and channel attention of a feature map (FGD_SPEC.md section 1).

    Args:
        feature: (N, C, H, W).
        temperature: softmax temperature, > 0.

    Returns:
        spatial (N, H, W), summing to H*W per image; channel (N, C), summing to C per image.
    """
    n, c, h, w = feature.shape
    magnitude = feature.abs()
    spatial = h * w * torch.softmax(magnitude.mean(dim=1).view(n, -1) / temperature, dim=1)
    channel = c * torch.softmax(magnitude.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


class FGDLoss(nn.Module):
    """
    FGD loss of one FPN level.

    ``forward`` returns the unweighted terms ``fg``, ``bg``, ``attention``, ``global`` and their weighted sum
    ``total = alpha * fg + beta * bg + gamma * attention + lambda_ * global``. Every term is a sum over channels
    and cells divided by the number of images N (a per-image sum, not a mean).

    The module owns the trainable parts of the loss: a 1x1 align conv (student -> teacher channels, only when the
    channel counts differ) and one relation block per side for the global term (``GcBlock``, or ``NonLocalBlock``
    for the paper's Table 6). All of them take part in every forward, also for batches without boxes, so DDP never
    sees an unused parameter.

    Ablation switches (the paper's Tables 1, 4, 5, 6): ``feature_mask`` (see ``FEATURE_MASKS``), ``focal_loss``
    (fg, bg and attention terms), ``global_loss``, ``spatial_attention`` / ``channel_attention`` (off: weight 1 in
    the feature loss and that half of the attention loss dropped) and ``relation``. A term that is switched off is
    returned as a constant 0, so the returned keys never change.

    Computation runs in float32 (float64 if the module and features are float64) with autocast disabled, so
    half-precision features are upcast.
    """

    def __init__(
        self,
        *,
        student_channels: int = 256,
        teacher_channels: int = 256,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_: float = 5e-6,
        box_scaling: str = "padded",
        feature_mask: str = "split",
        focal_loss: bool = True,
        global_loss: bool = True,
        spatial_attention: bool = True,
        channel_attention: bool = True,
        relation: str = "GcBlock",
    ):
        """
        Args:
            student_channels, teacher_channels: channel counts C_s and C_t of the two feature maps.
            temperature: temperature of the attention softmax, > 0.
            alpha, beta, gamma, lambda_: weights (>= 0) of the fg, bg, attention and global terms in ``total``.
            box_scaling: "padded" (boxes mapped to cells with the padded batch size) or "image" (with each
                image's unpadded size, as the reference code does).
            feature_mask: one of ``FEATURE_MASKS``; "split" is the method.
            focal_loss, global_loss: compute the focal (fg, bg, attention) and the global terms.
            spatial_attention, channel_attention: use the teacher's spatial / channel attention.
            relation: relation module of the global term, one of ``RELATION_MODULES`` ("GcBlock", "NonLocal").
        """
        super().__init__()
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lambda_", lambda_)):
            if not 0 <= value < math.inf:
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value}")
        if box_scaling not in BOX_SCALING_MODES:
            raise ValueError(f"box_scaling must be one of {BOX_SCALING_MODES}, got {box_scaling!r}")
        if feature_mask not in FEATURE_MASKS:
            raise ValueError(f"feature_mask must be one of {FEATURE_MASKS}, got {feature_mask!r}")
        if relation not in RELATION_MODULES:
            raise ValueError(f"relation must be one of {tuple(RELATION_MODULES)}, got {relation!r}")
        if not (focal_loss or global_loss):
            raise ValueError("focal_loss and global_loss are both off: there is nothing to distil")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.box_scaling = box_scaling
        self.feature_mask = feature_mask
        self.focal_loss = bool(focal_loss)
        self.global_loss = bool(global_loss)
        self.spatial_attention = bool(spatial_attention)
        self.channel_attention = bool(channel_attention)
        self.relation = relation
        self.teacher_channels = teacher_channels
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        if self.global_loss:
            self.student_relation = RELATION_MODULES[relation](teacher_channels)
            self.teacher_relation = RELATION_MODULES[relation](teacher_channels)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"lambda_={self.lambda_}, box_scaling={self.box_scaling!r}, feature_mask={self.feature_mask!r}, "
            f"focal_loss={self.focal_loss}, global_loss={self.global_loss}, "
            f"spatial_attention={self.spatial_attention}, channel_attention={self.channel_attention}, "
            f"relation={self.relation!r}"
        )

    def forward(
        self,
        student_feature: torch.Tensor,
        teacher_feature: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor],
        image_sizes: Sequence[Tuple[int, int]],
        input_size: Tuple[int, int],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_feature: (N, C_s, H, W).
            teacher_feature: (N, C_t, H, W); detached here.
            gt_boxes: N float tensors (K_i, 4), XYXY in pixels of the resized, unpadded input images.
            image_sizes: N pairs (h_i, w_i), unpadded image sizes in pixels.
            input_size: (H_pad, W_pad), size of the padded batch tensor in pixels.

        Returns:
            dict of scalar tensors: "fg", "bg", "attention", "global" (unweighted) and "total" (weighted sum).
        """
        if student_feature.dim() != 4 or teacher_feature.dim() != 4:
            raise ValueError(
                f"features must be (N, C, H, W); got student {tuple(student_feature.shape)}, "
                f"teacher {tuple(teacher_feature.shape)}"
            )
        if (
            student_feature.shape[0] != teacher_feature.shape[0]
            or student_feature.shape[-2:] != teacher_feature.shape[-2:]
        ):
            raise ValueError(
                "student and teacher features must have the same batch size and spatial size; got student "
                f"{tuple(student_feature.shape)}, teacher {tuple(teacher_feature.shape)}"
            )
        if teacher_feature.shape[1] != self.teacher_channels:
            raise ValueError(
                f"teacher feature has {teacher_feature.shape[1]} channels, the loss was built for "
                f"{self.teacher_channels}"
            )
        dtype = self._compute_dtype(student_feature, teacher_feature)
        num_images = student_feature.shape[0]

        with torch.autocast(device_type=student_feature.device.type, enabled=False):
            student = student_feature.to(dtype)
            teacher = teacher_feature.detach().to(dtype)
            if self.align is not None:
                student = self.align(student)

            zero = student.new_zeros(())
            fg = bg = attention = relation = zero
            if self.focal_loss:
                fg, bg, attention = self._focal_terms(student, teacher, gt_boxes, image_sizes, input_size)
            if self.global_loss:
                relation = (self.student_relation(student) - self.teacher_relation(teacher)).pow(2).sum()
                relation = relation / num_images

        total = self.alpha * fg + self.beta * bg + self.gamma * attention + self.lambda_ * relation
        return {"fg": fg, "bg": bg, "attention": attention, "global": relation, "total": total}

    def _focal_terms(self, student, teacher, gt_boxes, image_sizes, input_size):
        """fg, bg and attention terms (FGD_SPEC.md sections 1-4) of aligned features (N, C, H, W)."""
        num_images, _, height, width = teacher.shape
        student_spatial, student_channel = attention_maps(student, self.temperature)
        teacher_spatial, teacher_channel = attention_maps(teacher, self.temperature)
        if self.feature_mask == "uniform":
            fg_mask = teacher.new_full((num_images, height, width), 1.0 / (height * width))
            bg_mask = None
        else:
            fg_mask, bg_mask = focal_masks(gt_boxes, image_sizes, input_size, (height, width),
                                           box_scaling=self.box_scaling, dtype=teacher.dtype, device=teacher.device)

        # sum_c A_c * (S - T)^2, then weighted per cell by the teacher's spatial attention: (N, H, W).
        squared_error = (student - teacher).pow(2)
        if self.channel_attention:
            cell_error = torch.einsum("nc,nchw->nhw", teacher_channel, squared_error)
        else:
            cell_error = squared_error.sum(dim=1)
        if self.spatial_attention:
            cell_error = cell_error * teacher_spatial

        zero = teacher.new_zeros(())
        fg = (cell_error * fg_mask).sum() / num_images if self.feature_mask != "background" else zero
        bg = (cell_error * bg_mask).sum() / num_images if self.feature_mask in ("split", "background") else zero
        attention = zero
        if self.channel_attention:
            attention = attention + (student_channel - teacher_channel).abs().sum() / num_images
        if self.spatial_attention:
            attention = attention + (student_spatial - teacher_spatial).abs().sum() / num_images
        return fg, bg, attention

    def _compute_dtype(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.dtype:
        wanted = torch.promote_types(torch.promote_types(student_feature.dtype, teacher_feature.dtype), torch.float32)
        param = next(self.parameters(), None)
        if param is None:  # focal terms only, equal channels: nothing trainable to match
            return wanted
        param_dtype = param.dtype
        if wanted != param_dtype and torch.finfo(wanted).bits > torch.finfo(param_dtype).bits:
            raise TypeError(
                f"features are {wanted} but the loss parameters are {param_dtype}; convert the loss module "
                f"(e.g. .double()) to compute in {wanted}"
            )
        return param_dtype
