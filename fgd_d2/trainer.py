"""``FGDTrainer``: Detectron2's DefaultTrainer with what FGD training needs."""
import functools
import logging
import os
import weakref

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import FGDCheckpointer, inherit_teacher_weights, save_student
from .distiller import FGDDistiller

__all__ = ["FGDTrainer", "STUDENT_EXPORT_NAME"]

logger = logging.getLogger(__name__)

STUDENT_EXPORT_NAME = "model_final_student.pth"


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class StudentExport(hooks.HookBase):
    """After the last iteration, write the student alone as ``OUTPUT_DIR/model_final_student.pth``."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, STUDENT_EXPORT_NAME)

    def after_train(self):
        trainer = self.trainer
        if trainer.iter + 1 < trainer.max_iter:  # interrupted: there is no final student
            return
        save_student(_unwrap(trainer.model).student.state_dict(), self.path)
        logger.info("Wrote the student-only checkpoint %s", self.path)


class FGDTrainer(DefaultTrainer):
    """
    DefaultTrainer plus: ``FGDDistiller`` checkpoints (``FGDCheckpointer``), ``MODEL.FGD.INHERIT_TEACHER``, the
    ``model_final_student.pth`` export, a COCO evaluator, ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` (the total
    norm over all trainable parameters, as the FGD reference uses) and multi-process training on the CPU (gloo).
    Plain Detectron2 configs train with it as with DefaultTrainer.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes: DDP on the CPU gets no device_ids (PyTorch rejects them for
        # CPU modules), and the checkpointer understands FGDDistiller checkpoints.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        # A fresh run loads MODEL.WEIGHTS now, so that an unusable file fails before the dataset is read;
        # resume_or_load then does not load it again.
        self._weights_loaded = bool(cfg.MODEL.WEIGHTS) and not FGDCheckpointer(model, cfg.OUTPUT_DIR).has_checkpoint()
        if self._weights_loaded:
            FGDCheckpointer(model, cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS, checkpointables=[])
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {"device_ids": None} if torch.device(cfg.MODEL.DEVICE).type == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = FGDCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg, with_teacher: bool = True):
        """Like ``DefaultTrainer.build_model``; ``with_teacher=False`` builds an FGDDistiller for evaluation only."""
        if cfg.MODEL.META_ARCHITECTURE == "FGDDistiller" and not with_teacher:
            model = FGDDistiller(cfg, with_teacher=False)
        else:
            model = build_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
            return super().build_optimizer(cfg, model)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(cfg, model)
        clipper = functools.partial(
            torch.nn.utils.clip_grad_norm_, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
        )
        optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
            type(optimizer), global_clipper=clipper
        )
        return optimizer

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        ret = super().build_hooks()
        if comm.is_main_process() and isinstance(_unwrap(self.model), FGDDistiller):
            # Before the final evaluation, so that a failing evaluation does not cost the trained student.
            evaluation = next(i for i, hook in enumerate(ret) if isinstance(hook, hooks.EvalHook))
            ret.insert(evaluation, StudentExport(self.cfg.OUTPUT_DIR))
        return ret

    def resume_or_load(self, resume=True):
        """Load the last checkpoint (resume) or MODEL.WEIGHTS; then, on a fresh start only, inherit the teacher."""
        resuming = resume and self.checkpointer.has_checkpoint()
        if resuming or not self._weights_loaded:
            super().resume_or_load(resume=resume)
        model = _unwrap(self.model)
        if not resuming and isinstance(model, FGDDistiller) and self.cfg.MODEL.FGD.INHERIT_TEACHER:
            inherit_teacher_weights(model.student, model.teacher, model.teacher_loaded_keys)
