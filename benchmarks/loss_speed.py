#!/usr/bin/env python
"""
Speed of FGDLoss, forward + backward over 5 FPN levels (p3-p7) of an 800x1216 padded batch, N=2, C=256,
100 boxes per image. Compares:

  * fgd_d2: FGDLoss as shipped (vectorised masks built every call);
  * loop:   the same math with masks built by a per-box Python loop with host syncs (as the reference code does);
  * floor:  the same math with the masks precomputed (mask construction costs nothing).

Prints median milliseconds and the ratios. Target: faster than the loop, within 1.25x of the floor.
Usage: python benchmarks/loss_speed.py [--device cuda] [--repeats 5]
"""
import argparse
import math
import statistics
import time

import torch

import fgd_d2.loss as loss_module
from fgd_d2.loss import FGDLoss

STRIDES = (8, 16, 32, 64, 128)


def loop_masks(gt_boxes, image_sizes, input_size, feature_size, box_scaling="padded", dtype=torch.float32,
               device=None):
    """Per-box loop with tensor values as slice bounds (one host sync per coordinate)."""
    h_pad, w_pad = input_size
    height, width = feature_size
    fg = torch.zeros(len(gt_boxes), height, width, dtype=dtype, device=device)
    for i, boxes in enumerate(gt_boxes):
        for x1, y1, x2, y2 in boxes.clamp(min=0):
            xl, xh = int(torch.floor(x1 / w_pad * width)), int(torch.ceil(x2 / w_pad * width))
            yl, yh = int(torch.floor(y1 / h_pad * height)), int(torch.ceil(y2 / h_pad * height))
            region = fg[i, yl:yh + 1, xl:xh + 1]
            region.copy_(torch.clamp(region, min=1.0 / ((yh + 1 - yl) * (xh + 1 - xl))))
    bg = (fg == 0).to(dtype)
    return fg, bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    h_pad, w_pad = 800, 1216
    image_sizes = [(800, 1199), (750, 1216)]
    boxes = []
    for h, w in image_sizes:
        xy = torch.rand(100, 2, generator=g) * torch.tensor([w * 0.9, h * 0.9])
        wh = 8 + torch.rand(100, 2, generator=g) * 300
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1).to(device))
    levels = []
    for stride in STRIDES:
        shape = (2, 256, math.ceil(h_pad / stride), math.ceil(w_pad / stride))
        student = torch.randn(shape, generator=g).to(device).requires_grad_(True)
        teacher = torch.randn(shape, generator=g).to(device)
        levels.append((student, teacher))
    return levels, boxes, image_sizes, (h_pad, w_pad)


def run(losses, levels, boxes, image_sizes, input_size, device):
    total = 0.0
    for loss, (student, teacher) in zip(losses, levels):
        total = total + loss(student, teacher, boxes, image_sizes, input_size)["total"]
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, losses, batch, device, repeats):
    """Median seconds per variant; the variants alternate within each repeat so drift hits all alike."""
    times = {name: [] for name in variants}
    original = loss_module.focal_masks
    try:
        for repeat in range(repeats + 1):
            for name, mask_fn in variants.items():
                loss_module.focal_masks = mask_fn
                start = time.perf_counter()
                run(losses, *batch, device)
                if repeat:  # the first round is a warm-up
                    times[name].append(time.perf_counter() - start)
    finally:
        loss_module.focal_masks = original
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = make_batch(device)
    levels, boxes, image_sizes, input_size = batch
    losses = [FGDLoss().to(device) for _ in STRIDES]

    precomputed = {}
    for student, _ in levels:
        key = tuple(student.shape[-2:])
        precomputed[key] = loss_module.focal_masks(boxes, image_sizes, input_size, key, device=device)

    def floor_masks(gt_boxes, image_sizes, input_size, feature_size, **kw):
        return precomputed[tuple(int(s) for s in feature_size)]

    ms = time_variants({"fgd_d2": loss_module.focal_masks, "loop": loop_masks, "floor": floor_masks},
                       losses, batch, device, args.repeats)
    ours, loop, floor = ms["fgd_d2"], ms["loop"], ms["floor"]
    print(f"device={device} levels=p3-p7 N=2 C=256 input=800x1216 boxes/image=100 repeats={args.repeats}")
    print(f"fgd_d2 (vectorised masks): {ours:9.1f} ms")
    print(f"per-box loop masks:        {loop:9.1f} ms   loop / fgd_d2  = {loop / ours:.2f}x")
    print(f"precomputed masks (floor): {floor:9.1f} ms   fgd_d2 / floor = {ours / floor:.2f}x  (target <= 1.25x)")


if __name__ == "__main__":
    main()
