"""KITTI 2-D object labels -> COCO format.

Input: `<kitti>/training/label_2/<id>.txt` and `<kitti>/training/image_2/<id>.png` (the devkit
layout; `<kitti>/label_2` and `<kitti>/image_2` directly also work). Each label line is
`type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]`.

Class rule (documented in the README):
- Car, Pedestrian, Cyclist are the three classes (ids 1, 2, 3).
- Van and Person_sitting are the KITTI benchmark's "neighbouring" classes of Car and Pedestrian:
  they become ignore regions (iscrowd=1), so detecting one is neither rewarded nor punished.
  With `map_similar=True` they are mapped to Car and Pedestrian instead.
- DontCare regions become ignore regions (iscrowd=1).
- Truck, Tram and Misc are dropped.

Splits (`kitti_splits`): train and val from `train_ids` / `val_ids` files, else `<kitti>/ImageSets/
{train,val}.txt`, else every fifth id (sorted) goes to val. The held-out test split, which no sweep
reads: `test_ids`, else `<kitti>/ImageSets/test.txt` when its ids are labelled and disjoint from
train and val (the devkit's own test.txt lists the unlabelled testing images, whose ids repeat the
training ones: it is not taken), else every second id of the val list (val keeps the others).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from PIL import Image

from clockdistill.errors import DataError

log = logging.getLogger(__name__)

CLASSES = ("Car", "Pedestrian", "Cyclist")
NEIGHBOURS = {"Van": "Car", "Person_sitting": "Pedestrian"}
DROPPED = {"Truck", "Tram", "Misc"}


def _find(kitti: Path, name: str) -> Path:
    for candidate in (kitti / "training" / name, kitti / name):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{kitti}: no {name}/ directory (expected training/{name}/ as in the KITTI devkit)")


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: id list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parse_label_file(path: Path, map_similar: bool = False) -> tuple[list[tuple[str, list[float], bool, dict]], int]:
    """Objects as (class name, [x, y, w, h], is_ignore_region, KITTI fields), and the count of degenerate
    boxes. The KITTI fields (raw type, truncation, occlusion) are what KITTI's own metric reads
    (evaluation/kitti.py): its difficulties, neighbouring classes and DontCare regions."""
    objects, degenerate = [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (15, 16):
            raise DataError(f"{path}:{n}: expected 15 fields (type ... rotation_y), got {len(parts)}")
        kind = parts[0]
        try:
            x1, y1, x2, y2 = (float(v) for v in parts[4:8])
            fields = {"type": parts[0], "truncated": float(parts[1]), "occluded": int(float(parts[2]))}
        except ValueError:
            raise DataError(
                f"{path}:{n}: truncated, occluded and bbox (fields 2, 3, 5-8) must be numbers, "
                f"got {parts[1:3] + parts[4:8]}"
            ) from None
        if kind in DROPPED:
            continue
        if x2 <= x1 or y2 <= y1:
            degenerate += 1
            continue
        box = [x1, y1, x2 - x1, y2 - y1]
        if kind in CLASSES:
            objects.append((kind, box, False, fields))
        elif kind in NEIGHBOURS:
            objects.append((NEIGHBOURS[kind], box, not map_similar, fields))
        elif kind == "DontCare":
            objects.append(("DontCare", box, True, fields))
        else:
            raise DataError(
                f"{path}:{n}: unknown KITTI class {kind!r} (expected Car, Van, Truck, Pedestrian, Person_sitting, "
                "Cyclist, Tram, Misc or DontCare)"
            )
    return objects, degenerate


def kitti_splits(
    kitti: Path,
    labelled: list[str],
    train_ids: str | Path | None = None,
    val_ids: str | Path | None = None,
    test_ids: str | Path | None = None,
) -> dict[str, list[str]]:
    """{train, val, test: ids} by the rules of this module's docstring."""
    if train_ids or val_ids:
        if not (train_ids and val_ids):
            raise DataError("--train-ids and --val-ids: give both id lists, or neither")
        splits = {"train": _read_ids(Path(train_ids)), "val": _read_ids(Path(val_ids))}
    elif (kitti / "ImageSets" / "train.txt").is_file():
        splits = {s: _read_ids(kitti / "ImageSets" / f"{s}.txt") for s in ("train", "val")}
    else:
        splits = {"train": [i for k, i in enumerate(labelled) if k % 5], "val": labelled[::5]}
    used = set(splits["train"]) | set(splits["val"])
    if test_ids:
        splits["test"] = _read_ids(Path(test_ids))
        overlap = sorted(set(splits["test"]) & used)
        if overlap:
            raise DataError(
                f"--test-ids {test_ids}: {len(overlap)} id(s) also in the train or val list (first: {overlap[0]}); "
                "the test split must be held out"
            )
        return splits
    listed = kitti / "ImageSets" / "test.txt"
    ids = _read_ids(listed) if listed.is_file() else []
    if ids and set(ids) <= set(labelled) and not set(ids) & used:
        splits["test"] = ids
    else:
        val = sorted(splits["val"])
        splits["val"], splits["test"] = val[0::2], val[1::2]
    return splits


def convert_kitti(
    kitti: str | Path,
    out: str | Path,
    train_ids: str | Path | None = None,
    val_ids: str | Path | None = None,
    map_similar: bool = False,
    copy: bool = False,
    test_ids: str | Path | None = None,
) -> dict[str, int]:
    """Write `out/annotations/instances_{train,val,test}.json` and `out/images/{split}/` (symlinks
    unless `copy`). Returns the number of images per split."""
    kitti, out = Path(kitti), Path(out)
    label_dir, image_dir = _find(kitti, "label_2"), _find(kitti, "image_2")
    all_ids = sorted(p.stem for p in label_dir.glob("*.txt"))
    if not all_ids:
        raise DataError(f"{label_dir}: no label files (*.txt)")
    splits = kitti_splits(kitti, all_ids, train_ids, val_ids, test_ids)
    categories = [{"id": i + 1, "name": c, "supercategory": "kitti"} for i, c in enumerate(CLASSES)]
    cat_id = {c: i + 1 for i, c in enumerate(CLASSES)}
    counts, degenerate = {}, 0
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        dest = out / "images" / split
        dest.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id, sid in enumerate(ids, 1):
            label = label_dir / f"{sid}.txt"
            if not label.is_file():
                raise DataError(f"{label}: label file for id {sid} of the {split} list not found")
            src = next(
                (image_dir / f"{sid}{ext}" for ext in (".png", ".jpg") if (image_dir / f"{sid}{ext}").is_file()), None
            )
            if src is None:
                raise DataError(f"{image_dir / (sid + '.png')}: missing image file for id {sid}")
            with Image.open(src) as im:
                width, height = im.size
            target = dest / src.name
            if not target.exists():
                shutil.copy2(src, target) if copy else os.symlink(src.resolve(), target)
            images.append({"id": image_id, "file_name": src.name, "width": width, "height": height})
            objects, bad = parse_label_file(label, map_similar)
            degenerate += bad
            for kind, box, ignore, fields in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        # ignore regions need a category for pycocotools; they only ever match as crowd
                        "category_id": cat_id.get(kind, cat_id["Car"]),
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": int(ignore),
                        "kitti": fields,  # for KITTI's own metric
                    }
                )
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
        counts[split] = len(images)
    if degenerate:
        log.warning("skipped %d degenerate KITTI boxes (x2 <= x1 or y2 <= y1)", degenerate)
    return counts
