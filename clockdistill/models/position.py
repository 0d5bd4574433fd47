"""Sine position encodings: of image grids (for the encoder) and of boxes (for decoder queries).

The constants follow the reference implementations: Deformable DETR offsets grid coordinates by
-0.5 and uses temperature 10000; DAB-DETR uses no offset and temperature 20; both normalise by the
unpadded extent and put y before x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _dim_t(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


def _interleave(pos: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as sin of the even and cos of the odd features, interleaved."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_grid_encoding(mask: Tensor, dim: int, temperature: float = 10000.0, offset: float = 0.5) -> Tensor:
    """Position encoding of a padded feature grid: mask (B, H, W) bool, True on padding ->
    (B, dim, H, W), the y half first. Coordinates count unpadded cells, minus `offset`, normalised
    by the unpadded extent of each image, so an object's position gets the same code in any batch."""
    not_mask = (~mask).to(torch.float32)
    y, x = not_mask.cumsum(1), not_mask.cumsum(2)
    eps = 1e-6
    y = (y - offset) / (y[:, -1:, :] + eps) * 2 * math.pi
    x = (x - offset) / (x[:, :, -1:] + eps) * 2 * math.pi
    dim_t = _dim_t(dim // 2, temperature, mask.device)
    pos_x, pos_y = _interleave(x[..., None] / dim_t), _interleave(y[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_box_encoding(boxes: Tensor, num_feats: int, temperature: float = 10000.0, order: str = "xywh") -> Tensor:
    """Encode normalised boxes or points (..., k) in [0, 1] as (..., k * num_feats): num_feats sine
    features per coordinate, 2 pi times the coordinate. `order` "xywh" keeps the coordinates as they
    are (Deformable DETR's proposals, the hybrid); "yxwh" puts y first (DAB-DETR's anchors)."""
    dim_t = _dim_t(num_feats, temperature, boxes.device)
    pos = _interleave(boxes.to(torch.float32)[..., None] * (2 * math.pi) / dim_t)  # (..., k, num_feats)
    if order == "yxwh":
        pos = torch.cat([pos[..., 1:2, :], pos[..., 0:1, :], pos[..., 2:, :]], dim=-2)
    return pos.flatten(-2)
