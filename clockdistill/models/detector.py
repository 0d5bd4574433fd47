"""The detector: backbone -> input projection -> encoder (memory) -> decoder -> per-layer heads.

`DETR.forward` returns a dict (see its docstring). `encode` and `decode` are public so that a
distiller can reuse a model's memory and run extra query groups through its decoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.config import ModelConfig
from clockdistill.models.backbone import ResNet
from clockdistill.models.position import sine_grid_encoding
from clockdistill.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, Memory
from clockdistill.ops.boxes import inverse_sigmoid


def _group_norm(d: int) -> nn.GroupNorm:
    groups = 32 if d % 32 == 0 and d >= 128 else max(1, d // 8)
    return nn.GroupNorm(groups, d)


class DETR(nn.Module):
    """Deformable DETR (multi-scale, `arch="deformable"`) or DAB-style DETR (single scale, `arch="dab"`),
    both with 4-d anchor queries and iterative box refinement."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (resolve it from the data set first)")
        self.cfg, self.num_classes = cfg, num_classes
        d = cfg.d_model
        self.backbone = ResNet(cfg.backbone_depth, cfg.backbone_width)
        deformable = cfg.arch == "deformable"
        if deformable:
            chans = self.backbone.out_channels
            n_direct = min(cfg.num_levels, len(chans))
            self.feature_indices = list(range(n_direct))
            proj = [nn.Sequential(nn.Conv2d(chans[i], d, 1), _group_norm(d)) for i in range(n_direct)]
            in_ch = chans[-1]
            for _ in range(cfg.num_levels - n_direct):  # extra coarser levels from strided convs
                proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, 2, 1), _group_norm(d)))
                in_ch = d
            self.n_levels = cfg.num_levels
        else:
            idx = ResNet.strides.index(cfg.feature_stride)
            self.feature_indices = [idx]
            proj = [nn.Sequential(nn.Conv2d(self.backbone.out_channels[idx], d, 1), _group_norm(d))]
            self.n_levels = 1
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.constant_(p[0].bias, 0)
        self.level_embed = nn.Parameter(torch.randn(self.n_levels, d) * 0.02)
        args = (d, cfg.nheads, cfg.ffn_dim, cfg.dropout, deformable, self.n_levels, cfg.n_points)
        self.encoder = Encoder(EncoderLayer(*args), cfg.enc_layers)
        self.decoder = Decoder(DecoderLayer(*args), cfg.dec_layers, d, num_classes)
        self.query_content = nn.Embedding(cfg.num_queries, d)
        self.query_anchor = nn.Embedding(cfg.num_queries, 4)
        with torch.no_grad():  # anchors spread over the image, small-to-medium boxes
            self.query_anchor.weight[:, :2].uniform_(0.0, 1.0)
            self.query_anchor.weight[:, 2:].uniform_(0.05, 0.3)
            self.query_anchor.weight.copy_(inverse_sigmoid(self.query_anchor.weight))

    def train(self, mode: bool = True) -> "DETR":
        super().train(mode)
        if mode and self.cfg.frozen_bn:  # running statistics only: the same normalisation for any batch split
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):  # also SyncBatchNorm
                    m.eval()
        return self

    def _levels(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.backbone(images)
        srcs = [self.input_proj[i](feats[fi]) for i, fi in enumerate(self.feature_indices)]
        x = feats[-1]
        for i in range(len(srcs), self.n_levels):
            x = self.input_proj[i](x)
            srcs.append(x)
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        return srcs, masks

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        """images (B, 3, H, W), mask (B, H, W) True on padding -> encoder memory and its geometry."""
        srcs, masks = self._levels(images, mask)
        flat_src, flat_pos, flat_mask, shapes, ratios = [], [], [], [], []
        for lvl, (src, m) in enumerate(zip(srcs, masks)):
            h, w = src.shape[-2:]
            shapes.append((h, w))
            pos = sine_grid_encoding(m, src.shape[1]).to(src.dtype) + self.level_embed[lvl].view(1, -1, 1, 1)
            flat_src.append(src.flatten(2).transpose(1, 2))  # (B, h*w, D)
            flat_pos.append(pos.flatten(2).transpose(1, 2))
            flat_mask.append(m.flatten(1))
            valid_h = (~m[:, :, 0]).sum(1).float() / h
            valid_w = (~m[:, 0, :]).sum(1).float() / w
            ratios.append(torch.stack([valid_w, valid_h], -1))
        src, pos, pad = torch.cat(flat_src, 1), torch.cat(flat_pos, 1), torch.cat(flat_mask, 1)
        valid_ratios = torch.stack(ratios, 1).to(src.dtype)
        memory = self.encoder(src, pos, pad, shapes, valid_ratios)
        return Memory(memory, pos, pad, shapes, valid_ratios)

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """Decode a query group: content (B, K, D), reference (B, K, 4) normalised cxcywh boxes,
        optional position (B, K, D) added to every layer's positional query, self_attn_mask (K, K)
        or (B, K, K) bool (True = may not attend), padding_mask (B, K) True on padded slots."""
        layers = self.decoder(content, reference, mem, position, self_attn_mask, padding_mask)
        return {**layers[-1], "aux_outputs": layers[:-1]}

    def default_queries(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The learned detection queries: content (B, Q, D) and reference boxes (B, Q, 4)."""
        content = self.query_content.weight[None].expand(batch_size, -1, -1)
        reference = self.query_anchor.weight.sigmoid()[None].expand(batch_size, -1, -1)
        return content, reference

    def forward(self, images: Tensor, mask: Tensor, extra_queries: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Returns
        pred_logits (B, Q, C) class logits (sigmoid, no background class);
        pred_boxes (B, Q, 4) normalised cxcywh of the unpadded image;
        aux_outputs: [{pred_logits, pred_boxes}] for every decoder layer but the last;
        memory (B, N, D), memory_pos (B, N, D), memory_padding_mask (B, N),
        spatial_shapes (L, 2) long, level_start_index (L,) long;
        extra: the same prediction keys for `extra_queries` (keys content, reference and optional
        position, self_attn_mask, padding_mask; see `decode`), decoded in a separate pass.
        """
        mem = self.encode(images, mask)
        out = self.decode(mem, *self.default_queries(images.shape[0]))
        out.update(
            memory=mem.memory,
            memory_pos=mem.pos,
            memory_padding_mask=mem.padding_mask,
            spatial_shapes=torch.tensor(mem.spatial_shapes, dtype=torch.long, device=images.device),
            level_start_index=torch.tensor(mem.level_start_index, dtype=torch.long, device=images.device),
        )
        if extra_queries is not None:
            out["extra"] = self.decode(mem, **extra_queries)
        return out
