"""Image and box transforms, and batching with padding masks.

Boxes inside a sample are normalised cxcywh relative to the image, so resizing never touches them;
a horizontal flip maps cx -> 1 - cx. Images are resized first and flipped after, so a flipped view
is an array operation on the resized image (what the decoded-image cache stores).

Two recipes (`data.resize`): `longest`, the image's longest side at a size, aspect ratio kept, batches
padded with a mask (the DETRs of Deformable DETR's line); `square`, every image stretched to
max_size x max_size and, in training, each batch interpolated to one size drawn from train_sizes
(RT-DETR's and D-FINE's recipe: fixed square inputs, no padding, batch-level multi-scale).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def longest_side_dims(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of a w x h image resized to longest side `size`, aspect kept."""
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_longest(image: Image.Image, size: int) -> Image.Image:
    new = longest_side_dims(*image.size, size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """PIL RGB or uint8 (H, W, 3) array -> normalised float (3, H, W)."""
    arr = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return (arr.float() / 255.0 - MEAN) / STD


class DetectionTransform:
    """Training: random longest side from `train_sizes`, then a random horizontal flip. Eval: resize
    to `max_size`. The random choices (`choose`) are separate from applying them (`apply`), so a
    data set that keeps images already resized (the decoded cache) skips the decode and resize.
    `square`: every image max_size x max_size; the drawn training size is the sample's `batch_scale`,
    to which `collate` interpolates its batch (the first sample's)."""

    def __init__(
        self, max_size: int, train: bool, train_sizes: list[int] | None = None, hflip: float = 0.5, square=False
    ):
        self.max_size, self.train, self.square = max_size, train, square
        self.train_sizes = list(train_sizes or []) or [max_size]
        self.hflip = hflip if train else 0.0

    @classmethod
    def for_data(cls, data, train: bool) -> "DetectionTransform":
        """The transform a DataConfig describes, for its training or its evaluation splits."""
        return cls(data.max_size, train, data.train_sizes, data.hflip, square=data.resize == "square")

    @property
    def sizes(self) -> list[int]:
        """Every size images are resized to (longest side, or square side) by this transform."""
        return [self.max_size] if self.square or not self.train else self.train_sizes

    @property
    def tag(self) -> str:
        """How `resize` resizes, for the names of files of resized images ("" = longest side)."""
        return "square" if self.square else ""

    def resize(self, image: Image.Image, size: int) -> Image.Image:
        return resize_square(image, size) if self.square else resize_longest(image, size)

    def stored_size(self, size: int) -> int:
        """The size a sample drawn at `size` is resized to (square: max_size; its batch is scaled later)."""
        return self.max_size if self.square else size

    @property
    def views(self) -> list[int]:
        """The flips it can produce: [0] or [0, 1] (1 = flipped)."""
        return [0, 1] if self.hflip else [0]

    def choose(self, rng: random.Random) -> tuple[int, int]:
        """(longest side, view) of one sample."""
        flip = int(bool(self.hflip) and rng.random() < self.hflip)
        size = rng.choice(self.train_sizes) if self.train else self.max_size
        return size, flip

    def apply(
        self, resized: Image.Image | np.ndarray, target: dict[str, Tensor], view: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """A resized image (PIL or uint8 HWC array) and its target -> tensor and target with
        `size` (h, w) and `view`."""
        arr = np.asarray(resized)
        if view:
            arr = arr[:, ::-1]
            boxes = target["boxes"].clone()
            boxes[:, 0] = 1.0 - boxes[:, 0]
            target = {**target, "boxes": boxes}
        target = {**target, "size": torch.tensor([arr.shape[0], arr.shape[1]]), "view": view}
        return to_tensor(arr), target

    def __call__(
        self, image: Image.Image, target: dict[str, Tensor], rng: random.Random
    ) -> tuple[Tensor, dict[str, Tensor]]:
        size, view = self.choose(rng)
        return self.sample(self.resize(image, self.stored_size(size)), target, view, size)

    def sample(self, resized, target: dict[str, Tensor], view: int, size: int) -> tuple[Tensor, dict[str, Tensor]]:
        """`apply`, and in square training the drawn size as the sample's `batch_scale`."""
        image, target = self.apply(resized, target, view)
        if self.square and self.train and size != self.max_size:
            target["batch_scale"] = size
        return image, target


def collate(
    batch: list[tuple[Tensor, dict]], pad_to: tuple[int, int] | None = None, multiple: int = 1
) -> tuple[Tensor, Tensor, list[dict]]:
    """Pad images to the batch's largest size rounded up to a `multiple` (or to the fixed canvas
    `pad_to` = (H, W), so that an image's features do not depend on the other images of its batch).
    Returns images (B, 3, H, W), mask (B, H, W) True on padding, and the list of targets. A square
    recipe's training batch is interpolated to its first sample's `batch_scale` (bilinear; boxes are
    relative, so unchanged)."""
    images, targets = zip(*batch)
    scale = targets[0].get("batch_scale")
    if scale is not None:
        stacked = F.interpolate(torch.stack(images), size=(scale, scale), mode="bilinear", align_corners=False)
        size = torch.tensor([scale, scale])
        targets = [{**t, "size": size} for t in targets]
        return stacked, torch.zeros(len(targets), scale, scale, dtype=torch.bool), targets
    H = -(-max(im.shape[1] for im in images) // multiple) * multiple
    W = -(-max(im.shape[2] for im in images) // multiple) * multiple
    if pad_to is not None:
        if H > pad_to[0] or W > pad_to[1]:
            raise ValueError(f"an image of {H}x{W} does not fit the fixed canvas {pad_to[0]}x{pad_to[1]}")
        H, W = pad_to
    out = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, list(targets)
