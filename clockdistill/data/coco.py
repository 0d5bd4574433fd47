"""Reading and validating COCO-format annotation files.

Layout of a data set directory: `annotations/instances_<split>.json` and the images in
`images/<split>/` (or COCO's own `<split>2017/`, or `<split>/`). Every schema violation is a
`DataError` naming the file and the offending entry; boxes with zero or negative size are skipped
and counted (they cannot be learned or evaluated), never silently kept.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clockdistill.errors import DataError

log = logging.getLogger(__name__)


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image directory) of a split of the data set at `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data set directory not found")
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise DataError(f"{ann}: annotation file not found (expected annotations/instances_<split>.json in {root})")
    for candidate in (root / "images" / split, root / f"{split}2017", root / split):
        if candidate.is_dir():
            return ann, candidate
    raise DataError(f"{root}: no image directory for split '{split}' (expected images/{split}/)")


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)  # absolute xyxy pixels
    category_ids: list[int] = field(default_factory=list)
    iscrowd: list[bool] = field(default_factory=list)


@dataclass
class CocoAnnotations:
    images: list[CocoImage]
    categories: list[dict[str, Any]]  # [{"id": int, "name": str}] sorted by id
    skipped_degenerate: int = 0


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DataError(f"{where}: expected {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_coco(path: str | Path, data: dict[str, Any] | None = None) -> CocoAnnotations:
    """Validate and parse a COCO instances file (or its already-loaded `data`)."""
    path = Path(path)
    if data is None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise DataError(f"{path}: annotation file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    _expect(isinstance(data, dict), str(path), "a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        _expect(isinstance(data.get(key), list), f"{path}: '{key}'", "a list")

    categories = []
    for i, cat in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        _expect(isinstance(cat, dict) and _is_int(cat.get("id")), where, "an object with an integer 'id'")
        _expect(isinstance(cat.get("name"), str), f"{where}.name", "a string")
        categories.append({"id": cat["id"], "name": cat["name"]})
    categories.sort(key=lambda c: c["id"])
    cat_ids = {c["id"] for c in categories}
    _expect(len(cat_ids) == len(categories), f"{path}: categories", "unique ids")

    images: dict[int, CocoImage] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        _expect(isinstance(img, dict), where, "an object")
        _expect(_is_int(img.get("id")), f"{where}.id", "an integer")
        _expect(isinstance(img.get("file_name"), str) and img["file_name"], f"{where}.file_name", "a non-empty string")
        for key in ("width", "height"):
            _expect(_is_int(img.get(key)) and img[key] > 0, f"{where}.{key}", "a positive integer")
        _expect(img["id"] not in images, f"{where}.id", f"a unique id ({img['id']} repeats)")
        images[img["id"]] = CocoImage(img["id"], img["file_name"], img["width"], img["height"])

    skipped = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _expect(isinstance(ann, dict), where, "an object")
        image = images.get(ann.get("image_id"))
        _expect(image is not None, f"{where}.image_id", f"the id of an entry in images, got {ann.get('image_id')!r}")
        cat = ann.get("category_id")
        if cat not in cat_ids:
            known = ", ".join(str(c) for c in sorted(cat_ids))
            raise DataError(f"{where}.category_id: unknown class {cat!r} (categories have ids {known})")
        bbox = ann.get("bbox")
        _expect(
            isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_num, bbox)),
            f"{where}.bbox",
            f"[x, y, width, height] with 4 finite numbers, got {bbox!r}",
        )
        x, y, w, h = (float(v) for v in bbox)
        # Clip to the image: a box partly outside is kept with its visible part.
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
        if x1 <= x0 or y1 <= y0:
            skipped += 1
            continue
        image.boxes.append([x0, y0, x1, y1])
        image.category_ids.append(cat)
        image.iscrowd.append(bool(ann.get("iscrowd", 0)))
    if skipped:
        log.warning("%s: skipped %d degenerate boxes (zero or negative width/height inside the image)", path, skipped)
    return CocoAnnotations(list(images.values()), categories, skipped)
