"""Synthetic COCO-format detection data: coloured shapes on textured backgrounds.

Four classes (circle, rectangle, triangle, cross), object sizes from small (< 32 px) to large, shapes
drawn over each other (boxes cover the visible part; objects mostly hidden are dropped), and some
images with no object at all. Every image is a function of (seed, split, index) alone, so the same
seed writes the same files byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASSES = ("circle", "rectangle", "triangle", "cross")
MIN_VISIBLE = 0.4  # an object less visible than this after occlusion is dropped
EMPTY_FRACTION = 0.08


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(-60, 60, size=3)
    img = base + grad
    kind = rng.integers(3)
    if kind == 0:  # stripes
        period = rng.uniform(6, 24)
        phase = np.sin((xx * np.cos(angle * 2) + yy * np.sin(angle * 2)) * 2 * math.pi / period)
        img = img + phase[..., None] * rng.uniform(5, 25)
    elif kind == 1:  # checker
        cell = int(rng.integers(6, 20))
        checker = ((xx // cell + yy // cell) % 2)[..., None]
        img = img + (checker - 0.5) * rng.uniform(10, 40)
    img = img + rng.normal(0, rng.uniform(3, 12), size=(h, w, 3))  # grain
    return img


def _shape_mask(
    rng: np.random.Generator, cls: str, h: int, w: int, box: tuple[float, float, float, float]
) -> np.ndarray:
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(canvas)
    if cls == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif cls == "rectangle":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif cls == "triangle":
        apex = rng.uniform(x0, x1)
        d.polygon([(apex, y0), (x1, y1), (x0, y1)], fill=255)
    else:  # cross: a horizontal and a vertical bar
        tx, ty = (x1 - x0) * 0.3, (y1 - y0) * 0.3
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d.rectangle([x0, cy - ty / 2, x1, cy + ty / 2], fill=255)
        d.rectangle([cx - tx / 2, y0, cx + tx / 2, y1], fill=255)
    return np.asarray(canvas) > 127


def render_image(seed: int, split: str, index: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image (H, W, 3) uint8 and its objects as (class index, [x, y, w, h]) of visible extent."""
    rng = np.random.default_rng([seed, sum(map(ord, split)), index])
    h, w = int(rng.integers(96, 145)), int(rng.integers(128, 177))
    img = _background(rng, h, w)
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 7))
    owner = np.full((h, w), -1, dtype=np.int32)  # which object shows at each pixel
    classes, areas = [], []
    for k in range(n):
        cls = int(rng.integers(len(CLASSES)))
        size = math.exp(rng.uniform(math.log(10), math.log(min(h, w) * 0.9)))
        aspect = math.exp(rng.uniform(-0.35, 0.35))
        bw, bh = min(size * aspect, w - 2), min(size / aspect, h - 2)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        mask = _shape_mask(rng, CLASSES[cls], h, w, (x0, y0, x0 + bw, y0 + bh))
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - img[mask].mean(0) if mask.any() else 0).max() < 60:
            colour = 255 - colour  # keep the shape visible against its background
        shade = 1 + rng.normal(0, 0.05, size=(h, w, 1))
        img = np.where(mask[..., None], colour * shade, img)
        owner[mask] = k
        classes.append(cls)
        areas.append(int(mask.sum()))
    objects = []
    for k, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == k)
        if areas[k] == 0 or len(xs) < MIN_VISIBLE * areas[k]:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append((cls, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def write_synthetic(out: str | Path, train: int, val: int, seed: int = 0, progress: bool = True, test: int = 0) -> Path:
    """Write a COCO-format data set: images/{train,val[,test]}/*.png and annotations/instances_{split}.json
    (a test split only when `test` > 0; every split's images are its own: adding one changes no other)."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val), ("test", test)):
        if split != "test" or count:
            _write_split(out, split, count, seed, progress)
    return out


def _write_split(out: Path, split: str, count: int, seed: int, progress: bool) -> None:
    """images/<split>/*.png and annotations/instances_<split>.json of `count` images."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(count), desc=f"synth {split}", disable=not progress, unit="img"):
        pixels, objects = render_image(seed, split, i)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(image_dir / name, optimize=False, compress_level=1)
        images.append({"id": i + 1, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for cls, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    doc = {
        "info": {"description": f"clockdistill synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def ensure_synthetic(
    out: str | Path, train: int, val: int, seed: int = 0, progress: bool = True, test: int = 0
) -> Path:
    """`write_synthetic` unless `out` already holds a data set (then it is reused as it is, with a
    test split of `test` images written when it has none)."""
    out = Path(out)
    if not (out / "annotations" / "instances_val.json").is_file():
        write_synthetic(out, train, val, seed=seed, progress=progress, test=test)
    elif test and not (out / "annotations" / "instances_test.json").is_file():
        _write_split(out, "test", test, seed, progress)
    return out
