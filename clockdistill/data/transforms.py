"""Image and box transforms, and batching with padding masks.

Boxes inside a sample are normalised cxcywh relative to the image, so resizing never touches them;
a horizontal flip maps cx -> 1 - cx.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def resize_longest(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if new == (w, h) else image.resize(new, Image.BILINEAR)


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> normalised float (3, H, W)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (arr.float() / 255.0 - MEAN) / STD


class DetectionTransform:
    """Training: random flip, random longest side from `train_sizes`. Eval: resize to `max_size`."""

    def __init__(self, max_size: int, train: bool, train_sizes: list[int] | None = None, hflip: float = 0.5):
        self.max_size, self.train = max_size, train
        self.train_sizes = list(train_sizes or []) or [max_size]
        self.hflip = hflip if train else 0.0

    def __call__(self, image: Image.Image, target: dict[str, Tensor], rng: random.Random) -> tuple[Tensor, dict[str, Tensor]]:
        if self.hflip and rng.random() < self.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = target["boxes"].clone()
            boxes[:, 0] = 1.0 - boxes[:, 0]
            target = {**target, "boxes": boxes}
        size = rng.choice(self.train_sizes) if self.train else self.max_size
        image = resize_longest(image, size)
        target = {**target, "size": torch.tensor([image.size[1], image.size[0]])}
        return to_tensor(image), target


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """Pad images to the batch's largest size. Returns images (B, 3, H, W), mask (B, H, W) True on
    padding, and the list of targets."""
    images, targets = zip(*batch)
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, list(targets)
