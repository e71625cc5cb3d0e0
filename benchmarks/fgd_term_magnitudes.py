#!/usr/bin/env python
"""
Magnitudes of the FGD terms against the detector's own losses, for choosing the loss weights on a new dataset.

The reference weights (FGD_SPEC.md presets) assume COCO-sized inputs, 256 FPN channels and the sum reduction over
C*H*W: on small images or narrow FPNs the unweighted terms are far smaller. This script runs a few training-mode
forward passes of an FGDDistiller config (no optimizer step) and prints, averaged over the batches: the detection
losses, each FGD term unweighted and weighted with the weights in use, and the factor that would make the weighted
FGD total equal to the detection total.

    python benchmarks/fgd_term_magnitudes.py --config-file configs/cpu/fgd_retinanet_R18_from_R34.yaml \
        --batches 8 DATASETS.COCO_FOLDER ../shared/data/bccd MODEL.FGD.TEACHER.WEIGHTS teacher.pth
"""
import argparse
from collections import defaultdict

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from fgd_d2 import FGDTrainer, add_fgd_config
from fgd_d2.data import apply_coco_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    apply_coco_folder(cfg)
    cfg.freeze()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)

    model = FGDTrainer.build_model(cfg)
    model.train()
    data = iter(FGDTrainer.build_train_loader(cfg))
    sums = defaultdict(float)
    with EventStorage(0) as storage, torch.no_grad():
        for _ in range(args.batches):
            losses = model(next(data))
            for name, value in losses.items():
                sums[name] += float(value)
            for name, (value, _) in storage.latest().items():
                if name.startswith("fgd/"):
                    sums[name] += float(value)
            storage.step()
    mean = {name: value / args.batches for name, value in sums.items()}

    detection = sum(v for k, v in mean.items() if k.startswith("loss_") and not k.startswith("loss_fgd"))
    fgd = sum(v for k, v in mean.items() if k.startswith("loss_fgd"))
    print(f"mean over {args.batches} batches of {cfg.SOLVER.IMS_PER_BATCH} images")
    print("detection losses:", ", ".join(f"{k} {v:.4g}" for k, v in mean.items()
                                          if k.startswith("loss_") and not k.startswith("loss_fgd")))
    print(f"  total {detection:.4g}")
    print("weighted FGD terms:", ", ".join(f"{k} {v:.4g}" for k, v in mean.items() if k.startswith("loss_fgd")))
    print(f"  total {fgd:.4g}")
    print("unweighted terms per level:")
    for k, v in sorted(mean.items()):
        if k.startswith("fgd/"):
            print(f"  {k} {v:.4g}")
    print(f"FGD total / detection total = {fgd / detection:.4g}; scaling every weight by "
          f"{detection / fgd:.4g} would make them equal")


if __name__ == "__main__":
    main()
