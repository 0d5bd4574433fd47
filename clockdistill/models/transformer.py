"""Encoder and decoder layers shared by both DETR variants.

The decoder is the DAB / Deformable-DETR "box refinement" decoder: each query carries a 4-d
reference box (normalised cxcywh); its positional query is an MLP of the box's sine encoding; every
layer predicts a box delta in logit space and the refined box (detached) is the next layer's
reference. The two variants differ only in the cross-attention: global attention over a single
level (DAB) or multi-scale deformable attention (Deformable DETR).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clockdistill.models.deformable_attention import MSDeformAttn
from clockdistill.models.position import sine_box_encoding
from clockdistill.ops.boxes import inverse_sigmoid


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@dataclass
class Memory:
    """Encoder output and the geometry needed to attend to it (or to rebuild its per-level grids)."""

    memory: Tensor  # (B, N, D), N = sum_l H_l * W_l, levels in order
    pos: Tensor  # (B, N, D) position (+ level) encoding of each token
    padding_mask: Tensor  # (B, N) True on padded tokens
    spatial_shapes: list[tuple[int, int]]  # [(H_l, W_l)] per level
    valid_ratios: Tensor  # (B, L, 2) unpadded fraction (w, h) of each level

    @property
    def level_start_index(self) -> list[int]:
        starts, total = [], 0
        for h, w in self.spatial_shapes:
            starts.append(total)
            total += h * w
        return starts


def _ffn(d_model: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
    )


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; self-attention is deformable (multi-scale) or global (single level)."""

    def __init__(
        self, d_model: int, nheads: int, ffn_dim: int, dropout: float, deformable: bool, n_levels: int, n_points: int
    ):
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.self_attn = MSDeformAttn(d_model, n_levels, nheads, n_points)
        else:
            self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = _ffn(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, src: Tensor, pos: Tensor, mask: Tensor, shapes: list[tuple[int, int]], ref_points: Tensor | None
    ) -> Tensor:
        q = src + pos
        if self.deformable:
            attn = self.self_attn(q, ref_points, src, shapes, mask)
        else:
            attn = self.self_attn(q, q, src, key_padding_mask=mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.dropout(self.ffn(src)))


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Centre of every token, normalised by the unpadded extent: (B, N, L, 2)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, device=valid_ratios.device),
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(
        self, src: Tensor, pos: Tensor, mask: Tensor, shapes: list[tuple[int, int]], valid_ratios: Tensor
    ) -> Tensor:
        ref = encoder_reference_points(shapes, valid_ratios) if self.layers and self.layers[0].deformable else None
        for layer in self.layers:
            src = layer(src, pos, mask, shapes, ref)
        return src


class DecoderLayer(nn.Module):
    def __init__(
        self, d_model: int, nheads: int, ffn_dim: int, dropout: float, deformable: bool, n_levels: int, n_points: int
    ):
        super().__init__()
        self.deformable = deformable
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        if deformable:
            self.cross_attn = MSDeformAttn(d_model, n_levels, nheads, n_points)
        else:
            self.cross_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = _ffn(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        ref_boxes: Tensor,
        mem: Memory,
        self_attn_mask: Tensor | None,
        query_padding_mask: Tensor | None,
    ) -> Tensor:
        q = tgt + query_pos
        attn = self.self_attn(
            q, q, tgt, attn_mask=self_attn_mask, key_padding_mask=query_padding_mask, need_weights=False
        )[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        q = tgt + query_pos
        if self.deformable:
            ratios = torch.cat([mem.valid_ratios, mem.valid_ratios], -1)  # (B, L, 4)
            refs = ref_boxes[:, :, None] * ratios[:, None]  # (B, Q, L, 4)
            attn = self.cross_attn(q, refs, mem.memory, mem.spatial_shapes, mem.padding_mask)
        else:
            attn = self.cross_attn(
                q, mem.memory + mem.pos, mem.memory, key_padding_mask=mem.padding_mask, need_weights=False
            )[0]
        tgt = self.norm2(tgt + self.dropout(attn))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class Decoder(nn.Module):
    """Decoder with per-layer class and box heads and iterative box refinement."""

    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int, num_classes: int):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior: p = 0.01
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(box_head.layers[-1].weight, 0.0)
        nn.init.constant_(box_head.layers[-1].bias, 0.0)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_layers))

    def forward(
        self,
        tgt: Tensor,
        ref_boxes: Tensor,
        mem: Memory,
        extra_pos: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """tgt (B, Q, D) content queries; ref_boxes (B, Q, 4) normalised cxcywh; self_attn_mask
        (Q, Q) or per image (B, Q, Q), True where a query may not attend to a key.

        Returns one {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4)} per layer, first to last.
        """
        if query_padding_mask is not None:
            # A row with every key masked gives NaN; such rows are all padding and ignored anyway.
            query_padding_mask = query_padding_mask & ~query_padding_mask.all(-1, keepdim=True)
        if self_attn_mask is not None and self_attn_mask.dim() == 3:  # per image (B, Q, Q) -> per head
            self_attn_mask = self_attn_mask.repeat_interleave(self.layers[0].self_attn.num_heads, 0)
        outputs = []
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_box_encoding(ref_boxes, self.d_model).to(tgt.dtype))
            if extra_pos is not None:
                query_pos = query_pos + extra_pos
            tgt = layer(tgt, query_pos, ref_boxes, mem, self_attn_mask, query_padding_mask)
            boxes = (self.box_heads[i](tgt) + inverse_sigmoid(ref_boxes)).sigmoid()
            outputs.append({"pred_logits": self.class_heads[i](tgt), "pred_boxes": boxes})
            ref_boxes = boxes.detach()
        return outputs
