"""The detection data set: a split of a COCO-format directory, read through its Parquet index."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from clockdistill.data.index import AnnotationIndex, load_index
from clockdistill.data.transforms import DetectionTransform
from clockdistill.errors import DataError
from clockdistill.ops.boxes import box_xyxy_to_cxcywh


class CocoDetection(Dataset):
    """Returns (image (3, H, W), target) with target keys: boxes (n, 4) normalised cxcywh, labels (n,)
    contiguous class indices, image_id, orig_size (h, w), size (h, w). Crowd (ignore) regions are not
    training targets; evaluation still sees them through the annotation file."""

    def __init__(self, root: str | Path, split: str, transform: DetectionTransform, seed: int = 0):
        self.index: AnnotationIndex = load_index(root, split)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.cat_to_label = {c["id"]: i for i, c in enumerate(self.index.categories)}
        self.label_to_cat = [c["id"] for c in self.index.categories]
        self.class_names = [c["name"] for c in self.index.categories]

    @functools.cached_property
    def ground_truth(self) -> dict:
        """The annotation file as loaded JSON, read once: evaluation runs every epoch."""
        return json.loads(self.index.ann_path.read_bytes())

    @property
    def num_classes(self) -> int:
        return len(self.index.categories)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation depends on (seed, epoch, index): reproducible, and different every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def load_image(self, i: int) -> Image.Image:
        path = self.index.image_dir / self.index.file_names[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: missing image file (listed in {self.index.ann_path})") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from None

    def __getitem__(self, i: int):
        image = self.load_image(i)
        w, h = float(self.index.widths[i]), float(self.index.heights[i])
        boxes, cats, crowd = self.index.annotations(i)
        keep = ~crowd
        xyxy = torch.from_numpy(np.ascontiguousarray(boxes[keep], dtype=np.float32)).reshape(-1, 4)
        cxcywh = box_xyxy_to_cxcywh(xyxy / torch.tensor([w, h, w, h]))
        labels = torch.tensor([self.cat_to_label[int(c)] for c in cats[keep]], dtype=torch.int64)
        target = {
            "boxes": cxcywh,
            "labels": labels,
            "image_id": int(self.index.image_ids[i]),
            "orig_size": torch.tensor([int(h), int(w)]),
        }
        rng = random.Random(hash((self.seed, self.epoch, i)))
        return self.transform(image, target, rng)
