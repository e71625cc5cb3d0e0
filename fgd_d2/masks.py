"""Foreground (scale) and background masks of FGD, built from ground-truth boxes.

Pure torch; knows nothing about Detectron2. See FGD_SPEC.md section 2 for the contract.
"""
from typing import List, Sequence, Tuple

import torch

__all__ = ["BOX_SCALING_MODES", "focal_masks"]

BOX_SCALING_MODES = ("padded", "image")

# Upper bound on the elements of one (N, boxes, H, W) intermediate; boxes are processed in chunks below it.
_MAX_CHUNK_ELEMENTS = 1 << 24


def focal_masks(
    gt_boxes: Sequence[torch.Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    input_size: Tuple[int, int],
    feature_size: Tuple[int, int],
    box_scaling: str = "padded",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Build the foreground (scale) mask and the normalised background mask of one FPN level.

    Each box (XYXY, input pixels) is mapped to feature cells: ``x' = x / W_pad * W`` in ``"padded"`` mode (the
    default: the feature map spans the padded batch) or ``x' = x / w_i * W`` in ``"image"`` mode (the reference
    code's convention, which stretches boxes when the batch is padded). The box covers rows ``floor(y1')..ceil(y2')``
    and columns ``floor(x1')..ceil(x2')`` inclusive, clipped to the map, with weight
    ``1 / ((ceil(y2') + 1 - floor(y1')) * (ceil(x2') + 1 - floor(x1')))`` counted before clipping. Where boxes
    overlap, the largest weight (the smallest box) wins. Negative coordinates are clamped to 0; degenerate boxes
    (``x2 <= x1`` or ``y2 <= y1``, e.g. all-zero padding rows) are ignored.

    Vectorised over images and boxes (boxes in bounded-memory chunks); no host-device synchronisation.

    Args:
        gt_boxes: N float tensors of shape (K_i, 4), XYXY in pixels of the resized, unpadded input image.
        image_sizes: N pairs (h_i, w_i), unpadded image sizes in pixels.
        input_size: (H_pad, W_pad), size of the padded batch tensor in pixels.
        feature_size: (H, W), size of the feature map in cells.
        box_scaling: "padded" or "image".
        dtype: floating dtype of the returned masks.
        device: device of the returned masks (default: that of the boxes).

    Returns:
        (fg, bg): two tensors of shape (N, H, W). ``fg`` holds the per-cell box weights (0 outside boxes);
        ``bg`` is 1 outside boxes divided by its per-image sum (an image fully covered by boxes has ``bg == 0``).
    """
    if box_scaling not in BOX_SCALING_MODES:
        raise ValueError(f"box_scaling must be one of {BOX_SCALING_MODES}, got {box_scaling!r}")
    num_images = len(gt_boxes)
    if len(image_sizes) != num_images:
        raise ValueError(f"got {num_images} box tensors but {len(image_sizes)} image sizes")
    height, width = (int(s) for s in feature_size)
    if device is None:
        device = gt_boxes[0].device if num_images else torch.device("cpu")

    fg = torch.zeros(num_images, height, width, dtype=dtype, device=device)
    if num_images:
        boxes = _pad_boxes(gt_boxes, dtype, device)  # (N, K, 4), degenerate rows where padded
        scale_x, scale_y = _cell_scales(image_sizes, input_size, (height, width), box_scaling, dtype, device)
        _paint_boxes(fg, boxes, scale_x, scale_y)

    bg = (fg == 0).to(dtype)
    # Counts are integers >= 1 whenever bg is non-zero, so clamping only guards the fully covered case.
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return fg, bg


def _pad_boxes(gt_boxes: Sequence[torch.Tensor], dtype, device) -> torch.Tensor:
    """Stack N (K_i, 4) tensors into (N, max K_i, 4), padding with all-zero (degenerate, ignored) boxes."""
    boxes = [b.to(device=device, dtype=dtype).reshape(-1, 4) for b in gt_boxes]
    return torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)


def _cell_scales(image_sizes, input_size, feature_size, box_scaling, dtype, device):
    """Per-image factors (N, 1) that turn pixel x and y coordinates into feature-cell coordinates."""
    height, width = feature_size
    if box_scaling == "padded":
        sizes = [tuple(input_size)] * len(image_sizes)
    else:
        sizes = [tuple(s) for s in image_sizes]
    sizes = torch.tensor(sizes, dtype=dtype).to(device)  # (N, 2) as (h, w), pixels
    return (width / sizes[:, 1:2]), (height / sizes[:, 0:1])


def _paint_boxes(fg: torch.Tensor, boxes: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor) -> None:
    """Write into ``fg`` (N, H, W) the max over boxes (N, K, 4) of each box's weight on the cells it covers."""
    num_images, height, width = fg.shape
    boxes = boxes.clamp(min=0)
    valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # (N, K)
    x_lo = torch.floor(boxes[..., 0] * scale_x)
    x_hi = torch.ceil(boxes[..., 2] * scale_x)
    y_lo = torch.floor(boxes[..., 1] * scale_y)
    y_hi = torch.ceil(boxes[..., 3] * scale_y)
    weight = valid / ((y_hi + 1 - y_lo) * (x_hi + 1 - x_lo))  # (N, K); 0 for ignored boxes

    rows = torch.arange(height, dtype=fg.dtype, device=fg.device)
    cols = torch.arange(width, dtype=fg.dtype, device=fg.device)
    # Weighted row indicator (N, K, H) times column indicator (N, K, W) gives each box's weight on its cells.
    row_weight = ((rows >= y_lo[..., None]) & (rows <= y_hi[..., None])) * weight[..., None]
    col_cover = ((cols >= x_lo[..., None]) & (cols <= x_hi[..., None])).to(fg.dtype)

    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, num_images * height * width))
    for start in range(0, boxes.shape[1], chunk):
        stop = start + chunk
        painted = row_weight[:, start:stop, :, None] * col_cover[:, start:stop, None, :]  # (N, k, H, W)
        torch.maximum(fg, painted.amax(dim=1), out=fg)
