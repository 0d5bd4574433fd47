"""The hybrid detector (`arch: hybrid`): this project's own small DETR, not a published one.

Deformable DETR's multi-scale encoder with a DAB-style decoder: every query carries a 4-d anchor
box, its positional query is an MLP of the box's sine encoding recomputed at every layer, each
layer refines the box (the next layer's anchor, without its gradient), one head per layer. With
trainable BatchNorm in its backbone it trains from scratch on a CPU in minutes, which is what the
tests, the demo and the CPU benchmarks need; the presets named after a paper detector are the
faithful ones (deformable_detr.py, dab_detr.py).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from clockdistill.models.common import MLP, Detector, Memory, Queries, layer_outputs, level_masks, valid_ratio
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.deformable_attention import MSDeformAttn
from clockdistill.models.deformable_detr import encoder_reference_points
from clockdistill.models.position import sine_box_encoding, sine_grid_encoding
from clockdistill.models.resnet import ResNet
from clockdistill.ops.boxes import inverse_sigmoid


def _ffn(d: int, ffn: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d, n_levels, nheads, n_points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn, self.dropout = _ffn(d, ffn, dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor, shapes: list[tuple[int, int]], ref: Tensor) -> Tensor:
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, ref, src, shapes, pad)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformAttn(d, n_levels, nheads, n_points)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn, self.dropout = _ffn(d, ffn, dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, boxes: Tensor, mem: Memory, attn_mask, key_padding) -> Tensor:
        q = tgt + query_pos
        sa = self.self_attn(q, q, tgt, attn_mask=attn_mask, key_padding_mask=key_padding, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(sa))
        ratios = torch.cat([mem.valid_ratios, mem.valid_ratios], -1)  # (B, L, 4)
        ca = self.cross_attn(
            tgt + query_pos, boxes[:, :, None] * ratios[:, None], mem.memory, mem.spatial_shapes, mem.padding_mask
        )
        tgt = self.norm2(tgt + self.dropout(ca))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class HybridDETR(Detector):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        d, L = cfg.d_model, cfg.num_levels
        self.backbone = ResNet(
            cfg.backbone_depth, cfg.backbone_width, cfg.backbone_norm, cfg.dilation, cfg.backbone_frozen_stages
        )
        chans = self.backbone.out_channels
        n_direct = min(L, len(chans))
        proj = [nn.Sequential(nn.Conv2d(chans[i], d, 1), _group_norm(d)) for i in range(n_direct)]
        in_ch = chans[-1]
        for _ in range(L - n_direct):  # extra coarser levels from strided convs
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, 2, 1), _group_norm(d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.constant_(p[0].bias, 0)
        self.level_embed = nn.Parameter(torch.randn(L, d) * 0.02)
        args = (d, cfg.nheads, cfg.ffn_dim, cfg.dropout, L, cfg.n_points)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(cfg.dec_layers))
        self.ref_point_head = MLP(2 * d, d, d, 2)
        class_head = nn.Linear(d, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior: p = 0.01
        box_head = MLP(d, d, 4, 3)
        nn.init.constant_(box_head.layers[-1].weight, 0.0)
        nn.init.constant_(box_head.layers[-1].bias, 0.0)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(cfg.dec_layers))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(cfg.dec_layers))
        self.query_content = nn.Embedding(cfg.num_queries, d)
        self.query_anchor = nn.Embedding(cfg.num_queries, 4)
        with torch.no_grad():  # anchors spread over the image, small-to-medium boxes
            self.query_anchor.weight[:, :2].uniform_(0.0, 1.0)
            self.query_anchor.weight[:, 2:].uniform_(0.05, 0.3)
            self.query_anchor.weight.copy_(inverse_sigmoid(self.query_anchor.weight))

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        feats = self.backbone(images)
        srcs = [self.input_proj[i](feats[i]) for i in range(min(self.cfg.num_levels, len(feats)))]
        x = feats[-1]
        for i in range(len(srcs), self.cfg.num_levels):
            x = self.input_proj[i](x)
            srcs.append(x)
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        masks = level_masks(mask, shapes)
        flat_src, flat_pos = [], []
        for lvl, (src, m) in enumerate(zip(srcs, masks)):
            pos = sine_grid_encoding(m, src.shape[1]).to(src.dtype) + self.level_embed[lvl].view(1, -1, 1, 1)
            flat_src.append(src.flatten(2).transpose(1, 2))  # (B, h*w, D)
            flat_pos.append(pos.flatten(2).transpose(1, 2))
        src, pos = torch.cat(flat_src, 1), torch.cat(flat_pos, 1)
        pad = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratio(m) for m in masks], 1).to(src.dtype)
        ref = encoder_reference_points(shapes, ratios)
        features = src
        for layer in self.encoder:
            src = layer(src, pos, pad, shapes, ref)
        return Memory(src, pos, pad, shapes, ratios, features)

    def default_queries(self, mem: Memory) -> Queries:
        B = mem.memory.shape[0]
        content = self.query_content.weight[None].expand(B, -1, -1)
        return Queries(content, self.query_anchor.weight.sigmoid()[None].expand(B, -1, -1))

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """content (B, K, D); reference (B, K, 4) anchor boxes; position (B, K, D), when given, is
        added to every layer's positional query."""
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        tgt, boxes, logits, out_boxes, hidden = content, reference, [], [], []
        for i, layer in enumerate(self.decoder):
            query_pos = self.ref_point_head(sine_box_encoding(boxes, self.cfg.d_model // 2).to(tgt.dtype))
            if position is not None:
                query_pos = query_pos + position
            tgt = layer(tgt, query_pos, boxes, mem, attn_mask, key_padding)
            refined = (self.box_heads[i](tgt) + inverse_sigmoid(boxes)).sigmoid()
            logits.append(self.class_heads[i](tgt))
            out_boxes.append(refined)
            hidden.append(tgt)
            boxes = refined.detach()
        return layer_outputs(logits, out_boxes, hidden)


def _group_norm(d: int) -> nn.GroupNorm:
    groups = 32 if d % 32 == 0 and d >= 128 else max(1, d // 8)
    return nn.GroupNorm(groups, d)
