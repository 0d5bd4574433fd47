"""A detector's outputs for an image independent of its batch's padding (the teacher's option).

The reference implementations pad a batch to its largest image, and an image's outputs then depend on
its companions: the stem's max-pool writes image values into the first padded row and column, which
the next convolutions read where the image alone reads zeros, each layer spreads that by its
receptive field, and the GroupNorm of the multi-scale families' input projections takes its
statistics over the whole padded map (tests/bench/padding_invariance.py measures it: 0.16-0.87 of the
memory's scale). A teacher whose outputs depend on the batch cannot be cached per image, and gives a
student a signal that changes with the images it happens to be batched with.

`PaddingInvariance(detector)` (a teacher's, installed once; `with inv.batch(mask): ...` per batch) or
the one-off `padding_invariant(detector, mask)` runs a forward as if each image were alone:

- in the backbone, each image's padding is zeroed before every convolution, after every
  normalisation layer and on the outputs, at that resolution's extent of the image (ceil(h / stride)
  rows, ceil(w / stride) columns: a stride-2 convolution's, pool's and the encoder's arithmetic);
- every GroupNorm of the detector takes its statistics over the image's own positions, and its
  output is zero on the padding (what a later convolution reads beyond the image alone);
- the modules whose arithmetic reads the batch's geometry (their `padding_invariant` flag, set by
  `set_padding_invariant`) use the image's own: the two-stage query selections keep padded tokens out
  of the top-k proposals (the reference ranks them too, scored by the bias on their zeroed memory),
  and DINO's decoder takes its queries' positional encoding from the boxes relative to the image
  (the reference scales them by the level-0 valid ratio first: a position relative to the canvas).

With a canvas that is a multiple of the detector's largest stride (`data.pad_multiple`), the level
masks (nearest resampling of the image mask) mark exactly those extents, and the memory at an
image's tokens and its decoder outputs equal the image's alone within float rounding (measured per
family in tests/test_padding_invariance.py). On an unpadded batch nothing changes. The detector's
own numbers (training, evaluation, export) stay the reference's: only a teacher uses this.
Architectures whose encoder has no padding mask (RT-DETR, D-FINE: their square recipe never pads)
are not made invariant by it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from clockdistill.models.resnet import FrozenBatchNorm2d

# families whose outputs this makes padding-invariant (their encoders mask padded keys)
INVARIANT_ARCHS = ("deformable", "dab", "dino", "hybrid")


class _Extents:
    """Each image's valid extent at any resolution of a (B, H, W) padding mask, memoised per shape."""

    def __init__(self, mask: Tensor):
        valid = ~mask
        self.H = mask.shape[-2]
        self.rows = valid.any(2).sum(1)  # (B,)
        self.cols = valid.any(1).sum(1)
        self._keep: dict[tuple[int, int], Tensor] = {}

    def keep(self, x: Tensor) -> Tensor:
        """(B, 1, h, w) in x's dtype: 1 inside each image's extent at x's resolution, 0 on padding."""
        h, w = x.shape[-2:]
        if (h, w) not in self._keep:
            stride = 2 ** round(math.log2(self.H / h))
            rows = torch.div(self.rows + stride - 1, stride, rounding_mode="floor")
            cols = torch.div(self.cols + stride - 1, stride, rounding_mode="floor")
            r = torch.arange(h, device=x.device)[None, :, None] < rows[:, None, None]
            c = torch.arange(w, device=x.device)[None, None, :] < cols[:, None, None]
            self._keep[(h, w)] = (r & c)[:, None]
        return self._keep[(h, w)].to(x.dtype)


def masked_group_norm(x: Tensor, keep: Tensor, norm: nn.GroupNorm) -> Tensor:
    """`norm`(x) with each image's statistics over its own positions (keep (B, 1, h, w), 1 inside),
    zero on the padding."""
    B, C, h, w = x.shape
    G = norm.num_groups
    xg = x.float().reshape(B, G, C // G, h * w)
    k = keep.float().reshape(B, 1, 1, h * w)
    n = (k.sum((2, 3), keepdim=True) * (C // G)).clamp(min=1)
    mean = (xg * k).sum((2, 3), keepdim=True) / n
    var = ((xg - mean) ** 2 * k).sum((2, 3), keepdim=True) / n
    y = ((xg - mean) / torch.sqrt(var + norm.eps)).reshape(B, C, h, w)
    if norm.affine:
        y = y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return (y * keep).to(x.dtype)


class PaddingInvariance:
    """Installed once on a detector (a teacher): hooks on its backbone and GroupNorms that do nothing
    until `batch(mask)` gives them a padded batch's extents, and the geometry flags set. Permanent
    hooks, not a set per forward: nothing to register on the hot path, one graph under torch.compile."""

    def __init__(self, detector: nn.Module):
        self.detector, self.extents = detector, None
        self.handles = []
        backbone = detector.backbone
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                self.handles.append(m.register_forward_pre_hook(self._conv_input))
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                self.handles.append(m.register_forward_hook(lambda _m, _i, out: self._zeroed(out)))
        self.handles.append(backbone.register_forward_hook(lambda _m, _i, outs: [self._zeroed(o) for o in outs]))
        for m in detector.modules():
            if isinstance(m, nn.GroupNorm):
                self.handles.append(m.register_forward_hook(self._group_norm))
        self.previous = set_padding_invariant(detector, True)

    def _conv_input(self, _m: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (self._zeroed(inputs[0]), *inputs[1:])

    def _zeroed(self, x: Tensor) -> Tensor:
        return x if self.extents is None else x * self.extents.keep(x)

    def _group_norm(self, m: nn.GroupNorm, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return out if self.extents is None else masked_group_norm(inputs[0], self.extents.keep(inputs[0]), m)

    @contextmanager
    def batch(self, mask: Tensor | None) -> Iterator[None]:
        """The detector's forwards in the block see `mask`'s images as alone. Whether the batch is
        padded at all is not asked (a host read: a device sync per step on a GPU); an unpadded one is
        multiplied by ones and its GroupNorm statistics taken over every position, which equals the
        reference within float rounding."""
        self.extents = _Extents(mask) if mask is not None else None
        try:
            yield
        finally:
            self.extents = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        set_padding_invariant(self.detector, self.previous)


@contextmanager
def padding_invariant(detector: nn.Module, mask: Tensor | None) -> Iterator[None]:
    """Within the block, `detector`'s forwards on images padded by `mask` (B, H, W, True on padding)
    give each image's outputs alone (module docstring)."""
    inv = PaddingInvariance(detector)
    try:
        with inv.batch(mask):
            yield
    finally:
        inv.remove()


def set_padding_invariant(detector: nn.Module, on: bool) -> bool:
    """Switch the geometry flags of `detector`'s modules (those with a `padding_invariant` attribute);
    returns the previous setting. A teacher sets it once; `padding_invariant` sets it for its block."""
    flagged = [m for m in detector.modules() if hasattr(m, "padding_invariant")]
    previous = any(m.padding_invariant for m in flagged)
    for m in flagged:
        m.padding_invariant = on
    return previous


def pad_multiple_for(detector: nn.Module) -> int:
    """The canvas multiple under which the level masks mark exactly each image's extent: the
    detector's largest stride (its extra levels included)."""
    cfg = detector.cfg  # C5 at stride 32, each level beyond the backbone's another 2
    return 32 * 2 ** max(cfg.num_levels - getattr(cfg, "backbone_levels", 3), 0)


def masked_topk_scores(scores: Tensor, padding_mask: Tensor, detector) -> Tensor:
    """Proposal scores (B, N) with padded tokens never selected when the detector runs
    padding-invariant (the reference selects among them: their zeroed memory scores by the bias)."""
    if detector.padding_invariant:
        return scores.masked_fill(padding_mask, float("-inf"))
    return scores
