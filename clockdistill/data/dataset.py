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

from clockdistill.data.decoded import DecodedImages
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
        self._decoded: dict[int, DecodedImages] = {}  # longest side -> mapped decoded images
        self._pending: dict[int, Path] = {}  # longest side -> decoded file another process is building
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
        """Augmentation depends on (seed, epoch, index): reproducible, and different every epoch.
        Decoded-image files that another process has finished since are mapped from now on."""
        self.epoch = epoch
        for size, path in list(self._pending.items()):
            if path.is_file():
                self._decoded[size] = DecodedImages(path, self.index)
                del self._pending[size]

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

    def use_decoded_cache(self, cache_dir: str = "", progress: bool = True, wait: bool = True) -> list[Path]:
        """Read images from the node's decoded-image files (one per size the transform produces),
        building them first where missing. With `wait` False a file another process is building is
        not waited for: images are decoded from their files until an epoch starts after it is done.
        Returns the paths."""
        t = self.transform
        for size in t.sizes:
            got = DecodedImages.open_or_build(
                self.index, size, self.load_image, cache_dir, progress, wait, t.resize, t.tag
            )
            if isinstance(got, Path):
                self._pending[size] = got
            else:
                self._decoded[size] = got
        return [d.path for d in self._decoded.values()] + list(self._pending.values())

    def __getstate__(self):  # DataLoader workers re-map the files instead of pickling the maps
        state = dict(self.__dict__)
        state["_decoded"] = {size: d.path for size, d in self._decoded.items()}
        return state

    def __setstate__(self, state):
        paths = state.pop("_decoded")
        self.__dict__.update(state)
        self._decoded = {size: DecodedImages(path, self.index) for size, path in paths.items()}

    def resized_image(self, i: int, size: int):
        """Image i resized by the transform to `size`: from the decoded cache when in use, else decoded
        from its file (PIL)."""
        if size in self._decoded:
            return self._decoded[size][i]
        return self.transform.resize(self.load_image(i), size)

    def target(self, i: int) -> dict:
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
        return target

    def __getitem__(self, i: int):
        rng = random.Random(hash((self.seed, self.epoch, i)))
        size, view = self.transform.choose(rng)
        return self.transform.sample(
            self.resized_image(i, self.transform.stored_size(size)), self.target(i), view, size
        )

    def view_item(self, i: int, view: int, size: int | None = None):
        """Sample i at a chosen view (0 plain, 1 flipped) and longest side (default: the first)."""
        size = size or self.transform.sizes[0]
        return self.transform.apply(self.resized_image(i, size), self.target(i), view)
