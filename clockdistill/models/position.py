"""Sine position encodings: of image grids (for the encoder) and of boxes (for decoder queries)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_grid_encoding(mask: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Position encoding of a padded feature grid.

    mask: (B, H, W) bool, True on padding. Returns (B, dim, H, W); coordinates are normalised by
    the unpadded extent of each image so the same object position gets the same code.
    """
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + eps) * 2 * math.pi
    npf = dim // 2
    dim_t = torch.arange(npf, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / npf)
    pos_x = x[..., None] / dim_t  # (B, H, W, npf)
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_box_encoding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Encode normalised cxcywh boxes (..., 4) as (..., 4 * dim // 2): dim // 2 features per coordinate."""
    npf = dim // 2
    dim_t = torch.arange(npf, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / npf)
    pos = boxes.to(torch.float32)[..., None] * (2 * math.pi) / dim_t  # (..., 4, npf)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2)
