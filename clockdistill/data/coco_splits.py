"""COCO 2017 as three splits: a slice of train2017 selects, val2017 is held out as the test split.

Sweeps rank their trials on the validation split and best-student reports on the test split, so
val2017, on which published COCO figures are measured, becomes the test split, and a fixed random
slice of train2017 (images chosen by a seeded draw, the same for the same seed) becomes the
validation split that sweeps select on:

    <out>/annotations/instances_{train,val,test}.json
    <out>/images/{train,val} -> <coco>/train2017     <out>/images/test -> <coco>/val2017   (symlinks)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from clockdistill.errors import DataError


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: not found (expected COCO 2017's annotations/instances_*2017.json)")
    return json.loads(path.read_text())


def _subset(doc: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    return {
        **{k: v for k, v in doc.items() if k not in ("images", "annotations")},
        "images": [i for i in doc["images"] if i["id"] in image_ids],
        "annotations": [a for a in doc["annotations"] if a["image_id"] in image_ids],
    }


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            raise DataError(f"{link}: exists and does not point to {target}")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), link, target_is_directory=True)


def split_coco(coco: str | Path, out: str | Path, val_images: int = 5000, seed: int = 0) -> dict[str, int]:
    """Write the three splits of this module's docstring; returns the image count per split."""
    coco, out = Path(coco), Path(out)
    train = _read(coco / "annotations" / "instances_train2017.json")
    test = _read(coco / "annotations" / "instances_val2017.json")
    for name in ("train2017", "val2017"):
        if not (coco / name).is_dir():
            raise DataError(f"{coco / name}: image directory not found")
    ids = sorted(i["id"] for i in train["images"])
    if not 0 < val_images < len(ids):
        raise DataError(f"--val: expected 1 to {len(ids) - 1} of train2017's {len(ids)} images, got {val_images}")
    val_ids = set(np.random.default_rng(seed).choice(ids, size=val_images, replace=False).tolist())
    docs = {"train": _subset(train, set(ids) - val_ids), "val": _subset(train, val_ids), "test": test}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, doc in docs.items():
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
        _link(coco / ("val2017" if split == "test" else "train2017"), out / "images" / split)
    return {split: len(doc["images"]) for split, doc in docs.items()}
