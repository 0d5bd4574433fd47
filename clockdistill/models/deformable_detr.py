"""Deformable DETR (Zhu et al., ICLR 2021) as in fundamentalvision/Deformable-DETR: plain, with
iterative bounding-box refinement (`box_refine`), and two-stage (`two_stage`, with refinement).

Number for number with the reference: the same layers in the same order, post-norm, the decoder's
self-attention before its cross-attention (norm2, then norm1, then norm3), 2-d reference points
from a linear layer of the learned positional query (plain, refine) or the top-k encoder proposals
(two-stage), reference points scaled by every level's valid ratio, the initialisation (sampling-
offset ring, level embedding N(0, 1), focal prior on the class head, zero last box layer with its
size bias at -2), and parameter names close enough that the original checkpoints and Hugging
Face's port load by a fixed renaming (weights/).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.common import (
    MLP,
    Detector,
    LayerStack,
    Memory,
    Queries,
    layer_outputs,
    level_masks,
    valid_ratio,
)
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.deformable_attention import MSDeformAttn
from clockdistill.models.invariance import masked_topk_scores
from clockdistill.models.position import sine_box_encoding, sine_grid_encoding
from clockdistill.models.resnet import ResNet
from clockdistill.ops.boxes import inverse_sigmoid

FOCAL_PRIOR = -math.log((1 - 0.01) / 0.01)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, n_levels: int, nheads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d, n_levels, nheads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.linear1, self.dropout2, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.dropout3, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d)

    def forward(self, src: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]], pad: Tensor) -> Tensor:
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, ref, src, shapes, pad)))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, n_levels: int, nheads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d, n_levels, nheads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.linear1, self.dropout3, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d)

    def forward(self, tgt: Tensor, query_pos: Tensor, ref: Tensor, mem: Memory, attn_mask, key_padding) -> Tensor:
        q = tgt + query_pos
        sa = self.self_attn(q, q, tgt, attn_mask=attn_mask, key_padding_mask=key_padding, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(sa))
        ca = self.cross_attn(tgt + query_pos, ref, mem.memory, mem.spatial_shapes, mem.padding_mask)
        tgt = self.norm1(tgt + self.dropout1(ca))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Centre of every token, normalised by its level's unpadded extent, then scaled by every
    level's valid ratio: (B, N, L, 2)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(
            # arange + 0.5 equals linspace(0.5, h - 0.5, h) bit for bit; unlike linspace's step count it
            # stays symbolic under torch.compile(dynamic=True), so a new input size does not recompile
            torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoderDetector(Detector):
    """What Deformable DETR and DINO share: the ResNet, the input projections (one per level, the
    coarser levels strided convolutions of the last map), the deformable encoder with its level
    embedding, and the two-stage proposals. `pos_temperature` and `pos_offset` are the encoder's
    sine position encoding (Deformable DETR: 10000 and 0.5; DINO: 20 and 0)."""

    padding_invariant = False  # the proposal top-k ignores padded tokens (models/invariance.py)

    pos_temperature, pos_offset = 10000.0, 0.5

    def _build_encoder(self, cfg) -> None:
        d, L = cfg.d_model, cfg.num_levels
        self.backbone = ResNet(
            cfg.backbone_depth,
            cfg.backbone_width,
            cfg.backbone_norm,
            cfg.dilation,
            cfg.backbone_frozen_stages,
            cfg.backbone_levels,
        )
        channels = self.backbone.out_channels if L > 1 else self.backbone.out_channels[-1:]
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in channels]
        in_ch = channels[-1]
        for _ in range(L - len(channels)):  # coarser levels from stride-2 convolutions of the last map
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, 2, 1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        self.level_embed = nn.Parameter(torch.empty(L, d))
        layer_args = (d, cfg.ffn_dim, cfg.dropout, L, cfg.nheads, cfg.n_points)
        self.encoder = LayerStack(EncoderLayer(*layer_args) for _ in range(cfg.enc_layers))

    def _reset_transformer(self, parts: list[nn.Module]) -> None:
        """The reference transformer's initialisation: xavier on every matrix of `parts`, then the
        deformable attention modules' own (the level embedding, N(0, 1), follows in the subclass,
        in the reference's order of draws)."""
        for part in parts:
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def _reset_input_proj(self) -> None:
        """Input projections: xavier with zero bias (the reference does this after building its heads)."""
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.constant_(p[0].bias, 0)

    # -- encoder ---------------------------------------------------------------------------------

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        feats = self.backbone(images)
        feats = feats if self.cfg.num_levels > 1 else feats[-1:]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for i in range(len(srcs), self.cfg.num_levels):
            srcs.append(self.input_proj[i](feats[-1] if i == len(feats) else srcs[-1]))
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        masks = level_masks(mask, shapes)
        d = self.cfg.d_model
        flat_src, flat_pos = [], []
        for lvl, (src, m) in enumerate(zip(srcs, masks)):
            pos = sine_grid_encoding(m, d, self.pos_temperature, self.pos_offset).to(src.dtype)
            flat_src.append(src.flatten(2).transpose(1, 2))  # (B, h*w, D)
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src, pos = torch.cat(flat_src, 1), torch.cat(flat_pos, 1)
        pad = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        ref = encoder_reference_points(shapes, ratios)
        features = src
        for layer in self.encoder.layers:
            src = layer(src, pos, ref, shapes, pad)
        return Memory(src, pos, pad, shapes, ratios, features)

    def _proposals(self, mem: Memory) -> tuple[Tensor, Tensor]:
        """Two-stage: one box per memory token (its cell's centre, side 0.05 * 2^level, in logit
        space; padded or near-border tokens +inf) and the memory projected for scoring them."""
        B = mem.memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(mem.spatial_shapes):
            m = mem.padding_mask[:, start : start + h * w].view(B, h, w)
            valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
            gy, gx = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=m.device),  # linspace(0, h - 1, h), symbolic
                torch.arange(w, dtype=torch.float32, device=m.device),
                indexing="ij",
            )
            grid = torch.cat([gx.unsqueeze(-1), gy.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(B, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(B, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(mem.padding_mask.unsqueeze(-1), float("inf")).masked_fill(
            ~valid, float("inf")
        )
        output = mem.memory.masked_fill(mem.padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output)), proposals


class DeformableDETR(DeformableEncoderDetector):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        d, L = cfg.d_model, cfg.num_levels
        if cfg.two_stage and not cfg.box_refine:
            raise ValueError(
                "model.two_stage: needs model.box_refine (the reference's two-stage variant refines boxes)"
            )
        self.two_stage, self.box_refine = cfg.two_stage, cfg.box_refine
        self.target_query_dim = 4 if cfg.box_refine else 2
        self._build_encoder(cfg)
        layer_args = (d, cfg.ffn_dim, cfg.dropout, L, cfg.nheads, cfg.n_points)
        self.decoder = LayerStack(DecoderLayer(*layer_args) for _ in range(cfg.dec_layers))
        if cfg.two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # [positional query | content query]
            self.reference_points = nn.Linear(d, 2)
        self._reset_transformer(
            [
                self.encoder,
                self.decoder,
                *([self.enc_output, self.pos_trans] if cfg.two_stage else [self.reference_points]),
            ]
        )
        if not cfg.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)
        class_embed, bbox_embed = nn.Linear(d, num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(class_embed.bias, FOCAL_PRIOR)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        if cfg.box_refine:  # one head per layer (and one for the two-stage proposals)
            n = cfg.dec_layers + int(cfg.two_stage)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(n))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(n))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], 0.0 if cfg.two_stage else -2.0)
        else:  # one head shared by every layer
            self.class_embed, self.bbox_embed = class_embed, bbox_embed
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
        self._reset_input_proj()

    def _head(self, i: int, kind: str) -> nn.Module:
        heads = self.class_embed if kind == "class" else self.bbox_embed
        return heads[i] if self.box_refine else heads

    # -- queries ---------------------------------------------------------------------------------

    def default_queries(self, mem: Memory) -> Queries:
        B, d = mem.memory.shape[0], self.cfg.d_model
        if not self.two_stage:
            query_pos, content = self.query_embed.weight.split(d, dim=1)
            query_pos, content = query_pos[None].expand(B, -1, -1), content[None].expand(B, -1, -1)
            return Queries(content, self.reference_points(query_pos).sigmoid(), query_pos)
        output_memory, proposals = self._proposals(mem)
        L = self.cfg.dec_layers
        enc_logits = self.class_embed[L](output_memory)
        enc_coords = self.bbox_embed[L](output_memory) + proposals
        k = min(self.cfg.num_queries, enc_logits.shape[1])
        topk = torch.topk(masked_topk_scores(enc_logits[..., 0], mem.padding_mask, self), k, dim=1)[1]
        coords = torch.gather(enc_coords, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
        pos_content = self.pos_trans_norm(self.pos_trans(sine_box_encoding(coords.sigmoid(), d // 2)))
        query_pos, content = pos_content.split(d, dim=2)
        enc = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
        return Queries(content, coords.sigmoid(), query_pos, {"enc_outputs": enc})

    # -- decoder ---------------------------------------------------------------------------------

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """content (B, K, D); reference (B, K, 2) points or (B, K, 4) boxes; position (B, K, D) the
        positional query (constant over the layers; zeros when None)."""
        query_pos = position if position is not None else torch.zeros_like(content)
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        ratios = mem.valid_ratios
        tgt, ref, logits, boxes, hidden = content, reference, [], [], []
        for i, layer in enumerate(self.decoder.layers):
            scale = torch.cat([ratios, ratios], -1) if ref.shape[-1] == 4 else ratios
            tgt = layer(tgt, query_pos, ref[:, :, None] * scale[:, None], mem, attn_mask, key_padding)
            delta = self._head(i, "box")(tgt)
            if ref.shape[-1] == 4:
                box = (delta + inverse_sigmoid(ref)).sigmoid()
            else:
                box = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()
            logits.append(self._head(i, "class")(tgt))
            boxes.append(box)
            hidden.append(tgt)
            if self.box_refine:  # the refined box is the next layer's reference, without its gradient
                ref = box.detach()
        return layer_outputs(logits, boxes, hidden)
