"""Checkpoints of the distiller: loading student weights, student-only export, teacher inheritance."""
import logging
import os
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .errors import ConfigError, brief

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

    def __init__(self, model, save_dir: str = "", *, weights_key: str = "MODEL.WEIGHTS", **kwargs):
        """
        Args:
            weights_key: the config key that names the weights this checkpointer loads, for error messages.
        """
        super().__init__(model, save_dir, **kwargs)
        self.weights_key = weights_key

    def load(self, path, *args, **kwargs):
        """fvcore's ``load``, with a missing, unfetchable or unreadable file as a ``ConfigError``."""
        if path:
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # a URL that cannot be fetched offline
                raise ConfigError(
                    f"cannot fetch the checkpoint {path!r} ({brief(e)}); {self._source_hint(path)}, "
                    "or pre-seed the download cache ($FVCORE_CACHE, else ~/.torch/iopath_cache)"
                ) from e
            if not os.path.isfile(local):
                raise ConfigError(f"the checkpoint {path!r} does not exist; {self._source_hint(path)}")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # torch / pickle raise many types for truncated or foreign files
            raise ConfigError(
                f"cannot read the checkpoint {filename!r}: not a Detectron2 checkpoint (.pth with a state dict, "
                f"or a model-zoo .pkl), or corrupted ({brief(e)}); {self._source_hint(filename)}"
            ) from e
        if not isinstance(checkpoint.get("model"), dict):
            raise ConfigError(f"the checkpoint {filename!r} holds no state dict under 'model'; "
                              f"{self._source_hint(filename)}")
        return checkpoint

    def _source_hint(self, path) -> str:
        """Which setting named ``path``: the last checkpoint of OUTPUT_DIR (--resume) or MODEL.WEIGHTS."""
        if self.save_dir and self.has_checkpoint() and os.path.abspath(path) == os.path.abspath(
                self.get_checkpoint_file()):
            return (f"it is the last checkpoint named by {os.path.join(self.save_dir, 'last_checkpoint')}: point "
                    "that file at an intact checkpoint, or run without --resume")
        return f"check {self.weights_key}"

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
                f"{sorted(state)[:3]}); check {self.weights_key} (or the last checkpoint in OUTPUT_DIR when resuming)"
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
        try:
            checkpoint = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # torch / pickle raise many types for truncated or foreign files
            raise ConfigError(f"cannot read {src} as a checkpoint ({brief(e)})") from e
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not _is_distiller_state(state):
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
