"""Checkpoints of the distiller: loading student weights, student-only export, teacher inheritance."""
import logging
import os
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .errors import ConfigError

__all__ = ["FGDCheckpointer", "export_student", "inherit_teacher_weights", "STUDENT_PREFIX"]

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


def _is_distiller_state(state: Dict[str, object]) -> bool:
    return any(key.startswith(STUDENT_PREFIX) for key in state)


class FGDCheckpointer(DetectionCheckpointer):
    """
    A ``DetectionCheckpointer`` that also loads student-only weights into an ``FGDDistiller``.

    Our own training checkpoints (keys ``student.*`` and ``distill_losses.*``) load as they are; anything else
    (an ImageNet backbone ``.pkl``, a model-zoo ``.pkl``, a student-only ``.pth``) is loaded into
    ``model.student`` with Detectron2's usual conversions. The teacher is never touched. A checkpoint that loads
    no weight at all is an error. ``last_incompatible`` keeps the missing / unexpected keys of the last load.
    """

    last_incompatible = None

    def load(self, path, *args, **kwargs):
        """fvcore's ``load``, with a missing or unfetchable file as a ``ConfigError`` instead of an assertion."""
        if path:
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # a URL that cannot be fetched offline
                raise ConfigError(
                    f"cannot fetch the checkpoint {path!r} ({type(e).__name__}: {e}); check MODEL.WEIGHTS, or "
                    "pre-seed the download cache ($FVCORE_CACHE, else ~/.torch/iopath_cache)"
                ) from e
            if not os.path.isfile(local):
                raise ConfigError(f"the checkpoint {path!r} does not exist; check MODEL.WEIGHTS")
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        student = getattr(self.model, "student", None)
        if student is None or _is_distiller_state(state):
            if student is not None and not len(self.model.distill_losses):
                # A student-only distiller (evaluation) ignores the loss modules of a training checkpoint.
                checkpoint["model"] = {k: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
            target_keys = [name for name, _ in self.model.named_parameters()]
            incompatible = super()._load_model(checkpoint)
        else:
            target_keys = [name for name, _ in student.named_parameters()]
            incompatible = DetectionCheckpointer(student)._load_model(checkpoint)
        not_loaded = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        if target_keys and not_loaded.issuperset(target_keys):
            raise ConfigError(
                "the checkpoint loads no weight into the model (none of its keys match, e.g. "
                f"{sorted(state)[:3]}); check MODEL.WEIGHTS (or the last checkpoint in OUTPUT_DIR when resuming)"
            )
        self.last_incompatible = incompatible
        return incompatible


def student_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's weights out of a distiller state dict (keys without the ``student.`` prefix)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def export_student(src: str, dst: str) -> int:
    """
    Write a student-only checkpoint ``{"model": state_dict}`` that stock Detectron2 loads without fgd_d2.

    Args:
        src: one of our training checkpoints (``model_*.pth`` with ``student.*`` keys).
        dst: output ``.pth`` path.

    Returns:
        the number of tensors written.
    """
    with PathManager.open(src, "rb") as f:
        checkpoint = torch.load(f, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint)
    if not _is_distiller_state(state):
        raise ConfigError(f"{src} is not an FGDDistiller checkpoint (no '{STUDENT_PREFIX}*' keys)")
    student = student_state_dict(state)
    save_student(student, dst)
    return len(student)


def save_student(student_state: Dict[str, torch.Tensor], dst: str) -> None:
    """Atomically write ``{"model": student_state}`` to ``dst``."""
    tmp = dst + ".tmp"
    with PathManager.open(tmp, "wb") as f:
        torch.save({"model": student_state}, f)
    os.replace(tmp, dst)


def inherit_teacher_weights(student, teacher, teacher_loaded_keys=None) -> Tuple[List[str], List[str]]:
    """
    The inheriting strategy: copy every teacher tensor outside ``backbone.bottom_up.*`` whose shape matches into
    the student.

    Args:
        teacher_loaded_keys: keys the teacher checkpoint provided; other teacher tensors (random init) are skipped.

    Returns:
        (copied, skipped) key lists; ``skipped`` entries say why.
    """
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied, skipped = [], []
    for key, value in student_state.items():
        if key.startswith("backbone.bottom_up."):
            continue
        if key not in teacher_state:
            skipped.append(f"{key} (not in the teacher)")
        elif teacher_loaded_keys is not None and key not in teacher_loaded_keys:
            skipped.append(f"{key} (not in the teacher checkpoint)")
        elif teacher_state[key].shape != value.shape:
            skipped.append(f"{key} (shape {tuple(teacher_state[key].shape)} vs {tuple(value.shape)})")
        else:
            with torch.no_grad():
                value.copy_(teacher_state[key])
            copied.append(key)
    logger.info("INHERIT_TEACHER copied %d tensors into the student: %s", len(copied), ", ".join(copied))
    if skipped:
        logger.info("INHERIT_TEACHER skipped %d tensors: %s", len(skipped), "; ".join(skipped))
    if not any(not k.startswith("backbone.") for k in copied):
        inherited = "only the FPN was inherited" if copied else "nothing was inherited"
        logger.warning("MODEL.FGD.INHERIT_TEACHER: no head weight of the teacher matches the student (different "
                       "detector families or head shapes): the heads were not inherited, %s", inherited)
    return copied, skipped
