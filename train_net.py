#!/usr/bin/env python
"""
Train or evaluate detectors with FGD (Focal and Global Knowledge Distillation) in Detectron2.

Reads like Detectron2's tools/train_net.py and accepts plain Detectron2 configs too (to train a teacher or a
baseline student). Examples:

    python train_net.py --config-file configs/fgd_faster_rcnn.yaml --num-gpus 8
    python train_net.py --config-file configs/fgd_faster_rcnn.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/fgd_faster_rcnn.yaml --eval-only --eval-teacher
"""
import sys

import torch
from torch.multiprocessing import ProcessExitedException
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.config import get_cfg
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from fgd_d2 import ConfigError, FGDTrainer, add_fgd_config
from fgd_d2.errors import brief
from fgd_d2.checkpoint import FGDCheckpointer
from fgd_d2.data import apply_coco_folder
from fgd_d2.teacher import build_teacher


def setup(args):
    cfg = get_cfg()
    add_fgd_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except Exception as e:  # yacs and fvcore raise several types for bad files, keys and values
        raise ConfigError(f"invalid configuration (--config-file {args.config_file!r}, options {args.opts}): "
                          f"{brief(e)}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r}, but torch finds no CUDA device on this machine; "
                          "set MODEL.DEVICE cpu")
    apply_coco_folder(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fgd_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_teacher:
        teacher, _, _ = build_teacher(cfg)
        return FGDTrainer.test(cfg, teacher)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not (args.resume and FGDCheckpointer(None, cfg.OUTPUT_DIR).has_checkpoint()):
            raise ConfigError("--eval-only evaluates the student of MODEL.WEIGHTS, which is empty: set MODEL.WEIGHTS "
                              "(or use --resume with a checkpoint in OUTPUT_DIR)")
        model = FGDTrainer.build_model(cfg, with_teacher=False)
        FGDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return FGDTrainer.test(cfg, model)
    trainer = FGDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main_reporting_config_errors(args):
    """``main``, with a configuration mistake reported in one line (also from worker processes), not a traceback."""
    try:
        return main(args)
    except ConfigError as e:
        sys.exit(f"train_net.py: configuration error: {e}")


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--eval-teacher",
        action="store_true",
        help="evaluate the teacher of MODEL.FGD.TEACHER alone on DATASETS.TEST (a sanity check before training)",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch(
            main_reporting_config_errors,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:  # a worker exited, after printing why
        sys.exit(f"train_net.py: {e}")
