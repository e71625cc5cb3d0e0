"""Datasets given by path: any COCO-format folder, registered from ``DATASETS.COCO_FOLDER``."""
import functools
import hashlib
import json
import os
from typing import Tuple

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from .errors import ConfigError

__all__ = ["apply_coco_folder", "coco_folder_files", "register_coco_folder"]


def coco_folder_files(folder: str):
    """
    Paths of a COCO-format folder: ``images/`` and ``annotations/instances_{train,val}.json``.

    Returns:
        (image_root, train_json, val_json)
    """
    image_root = os.path.join(folder, "images")
    train_json = os.path.join(folder, "annotations", "instances_train.json")
    val_json = os.path.join(folder, "annotations", "instances_val.json")
    for path, what in ((folder, "folder"), (image_root, "image folder"), (train_json, "annotation file"),
                       (val_json, "annotation file")):
        if not os.path.exists(path):
            raise ConfigError(
                f"DATASETS.COCO_FOLDER={folder!r}: the {what} {path} does not exist. A COCO folder holds images/ "
                "and annotations/instances_train.json, annotations/instances_val.json"
            )
    return image_root, train_json, val_json


def register_coco_folder(folder: str):
    """
    Register the train and val splits of a COCO-format folder (idempotent).

    Returns:
        (train_name, val_name, num_classes)
    """
    folder = os.path.abspath(folder)
    image_root, train_json, val_json = coco_folder_files(folder)
    class_names = _checked_class_names(train_json, val_json)
    # The path's hash keeps two folders of the same name apart within one process.
    prefix = f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()[:6]}"
    names = (f"{prefix}_train", f"{prefix}_val")
    for name, json_file in zip(names, (train_json, val_json)):
        if name not in DatasetCatalog.list():
            # Class names up front (as load_coco_json sets them, by category id), for visualisers that run before
            # the dataset is loaded.
            register_coco_instances(name, {"thing_classes": list(class_names)}, json_file, image_root)
    return names[0], names[1], len(class_names)


@functools.lru_cache(maxsize=None)
def _checked_class_names(train_json: str, val_json: str) -> Tuple[str, ...]:
    """
    Category names of a COCO folder in category-id order, after checking that both annotation files parse as COCO
    instance files with the same categories (the validation file is otherwise read only by the evaluation after
    training).
    """
    categories = []
    for path in (train_json, val_json):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"DATASETS.COCO_FOLDER: cannot read {path}: {e}") from e
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
        if missing:
            raise ConfigError(f"DATASETS.COCO_FOLDER: {path} is not a COCO instances file (no {missing})")
        if not data["categories"]:
            raise ConfigError(f"DATASETS.COCO_FOLDER: {path} lists no categories")
        categories.append(sorted((c.get("id"), c.get("name")) for c in data["categories"]))
    if categories[0] != categories[1]:
        raise ConfigError(f"DATASETS.COCO_FOLDER: {train_json} and {val_json} list different categories")
    return tuple(name for _, name in categories[0])


def apply_coco_folder(cfg) -> None:
    """
    If ``DATASETS.COCO_FOLDER`` is set: register its splits, point ``DATASETS.TRAIN`` / ``DATASETS.TEST`` at them
    and set the detectors' ``NUM_CLASSES`` from the json. The config must not be frozen.
    """
    folder = cfg.DATASETS.COCO_FOLDER
    if not folder:
        return
    train_name, val_name, num_classes = register_coco_folder(folder)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.FCOS.NUM_CLASSES = num_classes
