"""
A small, deterministic COCO-format detection dataset of shapes on textured backgrounds.

Three classes (square, disc, triangle) of sizes from a few pixels to a third of the image, in random colours,
overlapping, on smooth-noise textures. Same seed, same bytes. Used by the demo when no dataset is given and by
the tests.

    python -m fgd_d2.synthetic OUTPUT_DIR [--train 300] [--val 60] [--size 256 192]
"""
import argparse
import json
import os

import cv2
import numpy as np

__all__ = ["CLASSES", "make_shapes_dataset"]

CLASSES = ("square", "disc", "triangle")


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour noise plus stripes, uint8 (H, W, 3)."""
    coarse = rng.uniform(40, 215, size=(max(2, height // 24), max(2, width // 24), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = 18 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image += stripes[..., None] + rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw(image: np.ndarray, rng: np.random.Generator, cls: int, box) -> None:
    x1, y1, x2, y2 = box
    color = tuple(int(c) for c in rng.uniform(0, 255, size=3))
    if CLASSES[cls] == "square":
        cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), color, thickness=-1)
    elif CLASSES[cls] == "disc":
        cv2.ellipse(image, (((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1), 0), color, thickness=-1)
    else:
        points = np.array([[(x1 + x2) // 2, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], dtype=np.int32)
        cv2.fillPoly(image, [points], color)


def _make_split(rng, image_dir, split, count, width, height, first_image_id, first_ann_id):
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(count):
        image_id = first_image_id + index
        image = _texture(rng, height, width)
        for _ in range(int(rng.integers(1, 7))):
            cls = int(rng.integers(len(CLASSES)))
            side = int(np.exp(rng.uniform(np.log(8), np.log(min(width, height) / 2.5))))
            aspect = rng.uniform(0.7, 1.4) if CLASSES[cls] != "disc" else rng.uniform(0.8, 1.25)
            w, h = max(4, int(side * aspect)), max(4, int(side / aspect))
            x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            _draw(image, rng, cls, (x1, y1, x1 + w, y1 + h))
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x1, y1, w, h], "area": float(w * h), "iscrowd": 0})
            ann_id += 1
        file_name = f"{split}_{index:05d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    return images, annotations


def make_shapes_dataset(root: str, num_train: int = 300, num_val: int = 60, image_size=(256, 192),
                        seed: int = 0) -> str:
    """
    Write the dataset to ``root`` (``images/``, ``annotations/instances_{train,val}.json``); skip if present.

    Args:
        image_size: (width, height) in pixels.

    Returns:
        ``root``.
    """
    width, height = image_size
    train_json = os.path.join(root, "annotations", "instances_train.json")
    val_json = os.path.join(root, "annotations", "instances_val.json")
    if os.path.isfile(train_json) and os.path.isfile(val_json):
        return root
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(train_json), exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    train = _make_split(rng, image_dir, "train", num_train, width, height, 1, 1)
    val = _make_split(rng, image_dir, "val", num_val, width, height, num_train + 1, len(train[1]) + 1)
    # val first: a half-written folder (no train json) is regenerated on the next call
    for path, (images, annotations) in ((val_json, val), (train_json, train)):
        with open(path + ".tmp", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        os.replace(path + ".tmp", path)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic shapes detection dataset (COCO format).")
    parser.add_argument("output")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_shapes_dataset(args.output, args.train, args.val, tuple(args.size), args.seed)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
