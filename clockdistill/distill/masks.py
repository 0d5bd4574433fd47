"""Ground-truth location masks over the encoder memory (the "location-and-context-aware" part).

For each image and memory level (an H_l x W_l grid covering the padded batch image):
- M (location): 1 on tokens inside a GT box, else 0. Variant "gaussian": each box is grown by a
  factor; tokens of the grown box outside the box get a Gaussian fall-off instead of 0.
- S (scale): 1 / (box area in level cells) inside boxes, the larger value (smaller box) winning
  where boxes overlap; 1 / (number of background tokens) outside. So every box, and the background
  as a whole, carries about the same total weight whatever its size.
Padded tokens are in neither mask (M = S = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clockdistill.ops.boxes import box_cxcywh_to_xyxy
from clockdistill.ops.host import small_tensor


def boxes_in_pixels(targets: list[dict], device: torch.device) -> tuple[Tensor, Tensor]:
    """GT boxes of a batch as absolute xyxy pixels of the (unpadded, resized) image, padded to the
    largest count: boxes (B, K, 4) and valid (B, K)."""
    k = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros(len(targets), k, 4, device=device)
    valid = torch.zeros(len(targets), k, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        if n:  # the image's (w, h, w, h) from its size tensor where it is: no host read per image
            scale = t["size"].to(device).float().flip(0).repeat(2)
            boxes[i, :n] = box_cxcywh_to_xyxy(t["boxes"].to(device).float()) * scale
            valid[i, :n] = True
    return boxes, valid


def level_masks(
    boxes: Tensor,
    valid: Tensor,
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    padding: Tensor,
    mode: str = "box",
    grow: float = 2.0,
    scale_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """M and S on one level's grid.

    boxes (B, K, 4) xyxy pixels in the padded image of size image_hw = (H, W); valid (B, K);
    grid_hw = (h, w) the level's grid; padding (B, h, w) True on padded tokens.
    Returns M, S of shape (B, h, w), float32.
    """
    B = boxes.shape[0]
    H, W = image_hw
    h, w = grid_hw
    device = boxes.device
    valid_tok = ~padding
    if boxes.shape[1] == 0:
        m = torch.zeros(B, h, w, device=device)
    else:
        cells = boxes * small_tensor([w / W, h / H, w / W, h / H], device)
        # Cells [x0, x1) x [y0, y1): min edges rounded down, max edges up (a box edge within 1e-3 cell
        # of a cell border, e.g. after the normalise/denormalise round trip, stays on that border),
        # at least one cell, inside the grid.
        eps = 1e-3
        x0 = (cells[..., 0] + eps).floor().clamp(0, w - 1)
        y0 = (cells[..., 1] + eps).floor().clamp(0, h - 1)
        x1 = torch.maximum((cells[..., 2] - eps).ceil().clamp(0, w), x0 + 1)
        y1 = torch.maximum((cells[..., 3] - eps).ceil().clamp(0, h), y0 + 1)
        xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, 1, w)
        ys = torch.arange(h, device=device, dtype=torch.float32).view(1, 1, h, 1)
        x0, y0, x1, y1 = (v[..., None, None] for v in (x0, y0, x1, y1))  # (B, K, 1, 1)
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1) & valid[..., None, None]
        if mode == "box":
            value = inside.float()
            area = (x1 - x0) * (y1 - y0)
        elif mode == "gaussian":
            # Distance (in cells, from cell centres) outside the box along each axis.
            cx, cy = xs + 0.5, ys + 0.5
            dx = (x0 - cx).clamp(min=0) + (cx - x1).clamp(min=0)
            dy = (y0 - cy).clamp(min=0) + (cy - y1).clamp(min=0)
            gx, gy = (grow - 1) * (x1 - x0) / 2, (grow - 1) * (y1 - y0) / 2  # margin of the grown box
            in_grown = (dx <= gx) & (dy <= gy) & valid[..., None, None]
            sx, sy = (gx / 2).clamp(min=0.5), (gy / 2).clamp(min=0.5)  # value exp(-2) per axis at the grown edge
            value = torch.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2)) * in_grown
            value = torch.where(inside, torch.ones_like(value), value)
            area = (x1 - x0 + 2 * gx).clamp(max=w) * (y1 - y0 + 2 * gy).clamp(max=h)
            inside = value > 0
        else:
            raise ValueError(f"unknown mask mode {mode!r}")
        m = value.amax(1)
        s_fg = (inside.float() / area).amax(1)
    m = m * valid_tok
    fg = (m > 0) & valid_tok
    if not scale_norm:
        return m, valid_tok.float()
    bg = valid_tok & ~fg
    n_bg = bg.flatten(1).sum(1).clamp(min=1).view(B, 1, 1).float()
    s = torch.where(bg, 1.0 / n_bg, torch.zeros((), device=device))
    if boxes.shape[1]:
        s = torch.where(fg, s_fg, s)
    return m, s


def memory_masks(
    targets: list[dict],
    image_hw: tuple[int, int],
    spatial_shapes: list[tuple[int, int]],
    padding_mask: Tensor,
    mode: str = "box",
    grow: float = 2.0,
    scale_norm: bool = True,
    level_hw: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor]:
    """M and S for a whole memory: (B, N) each, in token order (levels concatenated, row-major).
    `level_hw`: each level's own extent in input pixels (grids cropped to a common part, as across
    architectures), instead of `image_hw` for all."""
    boxes, valid = boxes_in_pixels(targets, padding_mask.device)
    ms, ss, start = [], [], 0
    for i, (h, w) in enumerate(spatial_shapes):
        pad = padding_mask[:, start : start + h * w].view(-1, h, w)
        hw = level_hw[i] if level_hw else image_hw
        m, s = level_masks(boxes, valid, hw, (h, w), pad, mode, grow, scale_norm)
        ms.append(m.flatten(1))
        ss.append(s.flatten(1))
        start += h * w
    return torch.cat(ms, 1), torch.cat(ss, 1)


def level_token_mask(spatial_shapes: list[tuple[int, int]], levels: list[int], device: torch.device) -> Tensor | None:
    """(N,) bool, True on the tokens of the chosen levels; None when every level is chosen."""
    if not levels:
        return None
    parts = [
        torch.full((h * w,), lvl in levels, dtype=torch.bool, device=device)
        for lvl, (h, w) in enumerate(spatial_shapes)
    ]
    return torch.cat(parts)
