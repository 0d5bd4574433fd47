"""Multi-scale deformable attention in plain PyTorch (bilinear sampling with grid_sample).

Each query attends to `n_points` sampled locations per head and level around its reference point,
with learned offsets and softmax weights (Deformable DETR, Zhu et al. 2021). No custom kernel: this
runs anywhere PyTorch does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.ops.host import small_tensor


def deformable_sample(
    value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Core of the attention.

    value: (B, N, H, Dh) with N = sum of H_l * W_l; locations: (B, Q, H, L, P, 2) in [0, 1] (x, y);
    weights: (B, Q, H, L, P). Returns (B, Q, H * Dh) in value's dtype.

    The sampling runs in at least fp32 (sample_dtype): grid_sample takes the grid in its input's dtype,
    and a location in [0, 1] rounded to bf16 is off by up to a third of a cell on a 167-cell level.
    """
    B, _, n_heads, head_dim = value.shape
    _, Q, _, L, P, _ = locations.shape
    out_dtype, dtype = value.dtype, sample_dtype(value, locations)
    value, weights = value.to(dtype), weights.to(dtype)
    grids = 2 * locations.to(dtype) - 1  # grid_sample wants [-1, 1]
    sampled = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = value[:, start : start + h * w]  # (B, h*w, H, Dh)
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(B * n_heads, head_dim, h, w)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * n_heads, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, Dh, Q, L*P)
    attn = weights.permute(0, 2, 1, 3, 4).reshape(B * n_heads, 1, Q, L * P)
    out = (stacked * attn).sum(-1).view(B, n_heads * head_dim, Q)
    return out.transpose(1, 2).to(out_dtype)


def sample_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype deformable sampling runs in: the widest of the tensors' and fp32 (bf16 / fp16 values
    and locations are sampled in fp32, fp64 stays fp64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def reset_deformable_attention(m: nn.Module, n_heads: int, points: list[int]) -> None:
    """The reference initialisation of a deformable attention module `m` (sampling_offsets,
    attention_weights, value_proj, output_proj) with `points[l]` points on level l: offsets start on a
    ring of directions, one per head, growing with the point index; uniform attention; xavier
    projections."""
    nn.init.constant_(m.sampling_offsets.weight, 0.0)
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True).values).reshape(n_heads, 1, 2).tile([1, sum(points), 1])
    grid = grid * torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in points]).reshape(1, -1, 1)
    with torch.no_grad():
        m.sampling_offsets.bias.copy_(grid.flatten())
    nn.init.constant_(m.attention_weights.weight, 0.0)
    nn.init.constant_(m.attention_weights.bias, 0.0)
    for proj in (getattr(m, "value_proj", None), getattr(m, "output_proj", None)):  # (D-FINE's has neither)
        if proj is not None:
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        reset_deformable_attention(self, self.n_heads, [self.n_points] * self.n_levels)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """query (B, Q, D); reference_points (B, Q, L, 2) points or (B, Q, L, 4) cxcywh boxes, in [0, 1];
        value_input (B, N, D); value_padding_mask (B, N) True on padding. Returns (B, Q, D)."""
        B, Q, _ = query.shape
        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(B, -1, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(B, Q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(B, Q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(B, Q, self.n_heads, self.n_levels, self.n_points)
        # locations in fp32 at least (under autocast the offsets come out of the linear layer in bf16)
        dtype = sample_dtype(offsets, reference_points)
        offsets, reference_points = offsets.to(dtype), reference_points.to(dtype)
        if reference_points.shape[-1] == 2:
            normaliser = small_tensor([[w, h] for h, w in spatial_shapes], offsets.device, offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        else:
            # Offsets scaled by the box size: sampling spreads over the box (box refinement).
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / self.n_points * size * 0.5
        out = deformable_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
