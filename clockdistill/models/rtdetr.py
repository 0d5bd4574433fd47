"""RT-DETR (Zhao et al., CVPR 2024) as in lyuwenyu/RT-DETR (rtdetr_pytorch): the real-time DETR; and
RT-DETRv2 (rtdetrv2_pytorch, `model.rtdetr_version: 2`), whose only change to the model is its decoder's
cross-attention (MSDeformAttnV2: points per level, an offset scale, discrete sampling).

Number for number with the reference:

- backbone: PResNet, the ResNet-vd of PaddleDetection (models/presnet.py); C3-C5 (strides 8, 16, 32)
  go on;
- hybrid encoder: a 1x1 convolution and BatchNorm per level to `encoder_dim`; AIFI, post-norm
  transformer encoder layers (GELU feed-forward) on the last level only, with a 2-d sin-cos position
  code; CCFF, a top-down FPN (1x1 lateral convolution, nearest 2x upsampling, concatenation, a
  CSPRep layer of RepVGG blocks: 3x3 and 1x1 convolution-BN branches summed, SiLU) and a bottom-up
  PAN (3x3 stride-2 convolution, concatenation, CSPRep layer);
- decoder: a 1x1 convolution and BatchNorm per level to `d_model`, flattened into the memory (no
  padding mask, no position code: the model reads fixed square inputs); IoU-aware query selection:
  every token is a proposal (`enc_output`: linear + LayerNorm; `enc_score_head`; `enc_bbox_head` on
  top of a grid anchor of size 0.05 x 2^level, anchors within 0.01 of an edge masked out), the top
  `num_queries` by their best class logit give the reference boxes and, detached, the content
  queries; post-norm decoder layers (self-attention, deformable cross-attention on 4-d boxes, ReLU
  feed-forward), the positional query an MLP of the reference box every layer, box refinement per
  layer with its own heads, the predicted box of layer i > 0 on the previous refined box with its
  gradient ("look forward twice");
- contrastive denoising queries in training (models/denoising.py, the label book
  `denoising_class_embed` with a zero padding row).

Inputs of any size and with a padding mask are taken as the reference cannot: images are padded to
a multiple of 32 (the FPN's upsampling needs it), the decoder works in the padded canvas's
coordinates (its anchors tile the canvas) and its boxes are rescaled to the unpadded image on the
way out (and query boxes given to `decode` on the way in), so square unpadded inputs of a multiple
of 32, the recipe these detectors train and deploy with, give the reference's numbers exactly. The encoder's
position code is the (y, x) one transformers' port computes; the reference's equals it on square
maps and transposes the grid's indices on others.

Parameter names are the reference's (weights/layouts.py maps transformers' port onto them).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.common import MLP, Detector, LayerStack, Memory, Queries, layer_outputs, valid_ratio
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.deformable_attention import MSDeformAttn, reset_deformable_attention, sample_dtype
from clockdistill.models.denoising import ContrastiveDenoising
from clockdistill.models.presnet import ConvNormLayer, PResNet, activation
from clockdistill.ops.boxes import inverse_sigmoid
from clockdistill.ops.host import small_tensor

FOCAL_PRIOR = -math.log((1 - 0.01) / 0.01)
INV_SIGMOID_EPS = 1e-5  # the reference's inverse_sigmoid
ANCHOR_EPS = 1e-2  # anchors closer than this to an edge are not proposals


# -- the hybrid encoder ---------------------------------------------------------------------------


class RepVggBlock(nn.Module):
    def __init__(self, ch: int, act: str):
        super().__init__()
        self.conv1 = ConvNormLayer(ch, ch, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(ch, ch, 1, 1, padding=0)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, num_blocks: int, expansion: float, act: str):
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, ch_out, 1, 1, act=act) if hidden != ch_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class AIFILayer(nn.Module):
    """A post-norm transformer encoder layer (GELU feed-forward), the reference's names."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout, batch_first=True)
        self.linear1, self.dropout, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.gelu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, device=None) -> Tensor:
    """(h * w, dim) 2-d sin-cos code of a row-major grid: sin, cos of y then of x."""
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32, device=device) / pos_dim)
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    out_y, out_x = gy.flatten()[:, None] * omega[None], gx.flatten()[:, None] * omega[None]
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], 1)


class HybridEncoder(nn.Module):
    """RT-DETR's hybrid encoder; D-FINE's (models/dfine.py) overrides the four block factories."""

    def __init__(self, in_channels: list[int], d: int, nheads: int, ffn: int, dropout: float, layers: int, cfg):
        super().__init__()
        self.d, self.num_layers = d, layers
        self.input_proj = nn.ModuleList(self.input_projection(c, d) for c in in_channels)
        self.encoder = nn.ModuleList([LayerStack(AIFILayer(d, nheads, ffn, dropout) for _ in range(layers))])
        n = len(in_channels)
        self.lateral_convs = nn.ModuleList(self.lateral(d) for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(self.fusion(d, cfg) for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(self.downsample(d) for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(self.fusion(d, cfg) for _ in range(n - 1))

    @staticmethod
    def input_projection(c: int, d: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, d, kernel_size=1, bias=False), nn.BatchNorm2d(d))

    @staticmethod
    def lateral(d: int) -> nn.Module:
        return ConvNormLayer(d, d, 1, 1, act="silu")

    @staticmethod
    def fusion(d: int, cfg) -> nn.Module:
        return CSPRepLayer(2 * d, d, round(3 * cfg.depth_mult), cfg.expansion, "silu")

    @staticmethod
    def downsample(d: int) -> nn.Module:
        return ConvNormLayer(d, d, 3, 2, act="silu")

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone maps -> (the fused maps, the projected maps the encoder started from)."""
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        inputs = list(proj)
        if self.num_layers > 0:  # AIFI on the last level
            h, w = proj[-1].shape[2:]
            src = proj[-1].flatten(2).permute(0, 2, 1)
            pos = sincos_2d(h, w, self.d, device=src.device)[None].to(src.dtype)
            for layer in self.encoder[0].layers:
                src = layer(src, pos)
            proj[-1] = src.permute(0, 2, 1).reshape(-1, self.d, h, w).contiguous()
        n = len(proj)
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):  # top-down
            high = self.lateral_convs[n - 1 - idx](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[n - 1 - idx](torch.cat([up, proj[idx - 1]], 1)))
        outs = [inner[0]]
        for idx in range(n - 1):  # bottom-up
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner[idx + 1]], 1)))
        return outs, inputs


# -- the decoder ----------------------------------------------------------------------------------


class MSDeformAttnV2(nn.Module):
    """RT-DETRv2's deformable cross-attention (rtdetrv2_decoder.py): `points` sampling points per level
    (one count each, or a list), offsets scaled by 1 / points x the box size x `offset_scale`, and
    `method` discrete: the value at the nearest cell instead of bilinear sampling (the offsets then take
    no gradient, as the reference's). Names as the reference's, `num_points_scale` included.
    `projections` off: no value and output projections (D-FINE's decoder samples the memory itself)."""

    def __init__(
        self, d: int, n_levels: int, n_heads: int, points: list[int], method: str, offset_scale: float, projections=True
    ):
        super().__init__()
        self.d_model, self.n_heads, self.points = d, n_heads, list(points)
        self.method, self.offset_scale, self.projections = method, offset_scale, projections
        total = sum(self.points)
        self.sampling_offsets = nn.Linear(d, n_heads * total * 2)
        self.attention_weights = nn.Linear(d, n_heads * total)
        if projections:
            self.value_proj, self.output_proj = nn.Linear(d, d), nn.Linear(d, d)
        scale = [1 / n for n in self.points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self._reset_parameters()
        if method == "discrete":
            for p in self.sampling_offsets.parameters():
                p.requires_grad_(False)

    def _reset_parameters(self) -> None:
        reset_deformable_attention(self, self.n_heads, self.points)

    def forward(self, query: Tensor, boxes: Tensor, value_input: Tensor, spatial_shapes: list[tuple[int, int]]):
        """query (B, Q, D); boxes (B, Q, 4) cxcywh in [0, 1]; value_input (B, N, D). Returns (B, Q, D)."""
        B, Q, _ = query.shape
        H, T, Dh = self.n_heads, sum(self.points), self.d_model // self.n_heads
        value = (self.value_proj(value_input) if self.projections else value_input).view(B, -1, H, Dh)
        offsets = self.sampling_offsets(query).view(B, Q, H, T, 2)
        weights = self.attention_weights(query).view(B, Q, H, T).softmax(-1)
        dtype = sample_dtype(value, offsets, boxes)  # locations and sampling in fp32 at least (see deformable_sample)
        offsets, boxes, value, weights = offsets.to(dtype), boxes.to(dtype), value.to(dtype), weights.to(dtype)
        scale = self.num_points_scale.to(dtype)[:, None]
        locations = boxes[:, :, None, None, :2] + offsets * scale * boxes[:, :, None, None, 2:] * self.offset_scale
        grids = locations.permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.points, dim=-2)
        values = value.permute(0, 2, 3, 1).flatten(0, 1).split([h * w for h, w in spatial_shapes], dim=-1)
        sampled = []
        for (h, w), v, g in zip(spatial_shapes, values, grids):
            v = v.reshape(B * H, Dh, h, w)
            if self.method == "discrete":
                cell = (g * small_tensor([w, h], g.device, g.dtype) + 0.5).to(torch.int64)
                x, y = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)  # (B*H, Q, P)
                rows = torch.arange(B * H, device=v.device)[:, None, None].expand_as(x)
                sampled.append(v[rows, :, y, x].permute(0, 3, 1, 2))  # (B*H, Dh, Q, P)
            else:
                grid = 2 * g - 1
                sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        attn = weights.permute(0, 2, 1, 3).reshape(B * H, 1, Q, T)
        out = (torch.cat(sampled, -1) * attn).sum(-1).view(B, H * Dh, Q).transpose(1, 2)
        out = out.to(value_input.dtype)
        return self.output_proj(out) if self.projections else out


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, n_levels: int, n_points: int, cfg=None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d)
        if cfg is not None and cfg.rtdetr_version == 2:
            points = list(cfg.level_points) or [n_points] * n_levels
            self.cross_attn = MSDeformAttnV2(d, n_levels, nheads, points, cfg.cross_attn_method, cfg.offset_scale)
        else:
            self.cross_attn = MSDeformAttn(d, n_levels, nheads, n_points)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.linear1, self.dropout3, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d)

    def forward(self, tgt: Tensor, ref: Tensor, mem: Memory, query_pos: Tensor, attn_mask, key_padding) -> Tensor:
        q = tgt + query_pos
        sa = self.self_attn(q, q, tgt, attn_mask=attn_mask, key_padding_mask=key_padding, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(sa))
        if isinstance(self.cross_attn, MSDeformAttnV2):
            ca = self.cross_attn(tgt + query_pos, ref, mem.memory, mem.spatial_shapes)
        else:
            L = len(mem.spatial_shapes)
            ca = self.cross_attn(tgt + query_pos, ref[:, :, None].expand(-1, -1, L, -1), mem.memory, mem.spatial_shapes)
        tgt = self.norm2(tgt + self.dropout2(ca))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3((tgt + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class RTDETRTransformer(nn.Module):
    """The reference's decoder module: input projections, query selection heads, the layers under
    `decoder.layers`, the positional-query MLP, per-layer heads and the denoising label book."""

    def __init__(self, cfg, in_channels: list[int], num_classes: int):
        super().__init__()
        d, L = cfg.d_model, cfg.num_levels
        self.input_proj = nn.ModuleList(
            nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, d, 1, bias=False)), ("norm", nn.BatchNorm2d(d))]))
            for c in in_channels
        )
        layer = DecoderLayer(d, cfg.nheads, cfg.ffn_dim, cfg.dropout, L, cfg.n_points, cfg)
        self.decoder = LayerStack(copy.deepcopy(layer) for _ in range(cfg.dec_layers))
        if cfg.dn_number > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, d, padding_idx=num_classes)
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_score_head = nn.Linear(d, num_classes)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(cfg.dec_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.enc_score_head.bias, FOCAL_PRIOR)
        nn.init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        nn.init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls_, reg in zip(self.dec_score_head, self.dec_bbox_head):
            nn.init.constant_(cls_.bias, FOCAL_PRIOR)
            nn.init.constant_(reg.layers[-1].weight, 0)
            nn.init.constant_(reg.layers[-1].bias, 0)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)


def grid_anchors(shapes: list[tuple[int, int]], device, grid_size: float = 0.05) -> tuple[Tensor, Tensor]:
    """(1, N, 4) anchors in logit space (cell centres, 0.05 x 2^level wide; +inf where masked) and
    the (1, N, 1) mask of those at least ANCHOR_EPS from every edge."""
    anchors = []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        xy = (torch.stack([gx, gy], -1) + 0.5) / small_tensor([w, h], device, torch.float32)
        wh = torch.ones_like(xy) * grid_size * (2.0**lvl)
        anchors.append(torch.cat([xy, wh], -1).reshape(-1, h * w, 4))
    a = torch.cat(anchors, 1)
    valid = ((a > ANCHOR_EPS) & (a < 1 - ANCHOR_EPS)).all(-1, keepdim=True)
    return torch.where(valid, torch.log(a / (1 - a)), torch.inf), valid


def pad_to_stride(images: Tensor, mask: Tensor, stride: int = 32) -> tuple[Tensor, Tensor]:
    """Images (and their padding mask) padded at the bottom and right to a multiple of the coarsest
    stride, which the FPN's 2x upsampling needs (the reference's inputs are 640 x 640)."""
    H, W = images.shape[-2:]
    ph, pw = -H % stride, -W % stride
    if not (ph or pw):
        return images, mask
    return F.pad(images, (0, pw, 0, ph)), F.pad(mask, (0, pw, 0, ph), value=True)


def _to_canvas(boxes: Tensor, ratios: Tensor) -> Tensor:
    """Boxes of the unpadded image (B, Q, 4) -> of the padded canvas; ratios (B, 2) unpadded (w, h)."""
    return boxes * ratios.repeat(1, 2)[:, None]


def _to_image(boxes: Tensor, ratios: Tensor) -> Tensor:
    return boxes / ratios.repeat(1, 2)[:, None]


class RTDETR(ContrastiveDenoising, Detector):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.backbone = PResNet(cfg.backbone_depth, cfg.backbone_width, cfg.backbone_norm, cfg.backbone_frozen_stages)
        enc_dim = cfg.encoder_dim or cfg.d_model
        self.encoder = HybridEncoder(
            self.backbone.out_channels,
            enc_dim,
            cfg.nheads,
            cfg.encoder_ffn_dim or cfg.ffn_dim,
            cfg.dropout,
            cfg.enc_layers,
            cfg,
        )
        self.decoder = RTDETRTransformer(cfg, [enc_dim] * len(self.backbone.out_channels), num_classes)

    # -- the Detector interface -------------------------------------------------------------------

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        images, mask = pad_to_stride(images, mask)
        feats, inputs = self.encoder(self.backbone(images))
        proj = [p(f) for p, f in zip(self.decoder.input_proj, feats)]
        shapes = [tuple(f.shape[2:]) for f in proj]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in proj], 1)
        B = images.shape[0]
        ratio = valid_ratio(mask)  # (B, 2) unpadded (w, h) of the canvas
        return Memory(
            memory=memory,
            pos=torch.zeros_like(memory),
            padding_mask=torch.zeros(B, memory.shape[1], dtype=torch.bool, device=memory.device),
            spatial_shapes=shapes,
            valid_ratios=ratio[:, None].expand(-1, len(shapes), -1),
            features=torch.cat([f.flatten(2).transpose(1, 2) for f in inputs], 1) if inputs else None,
        )

    def default_queries(self, mem: Memory) -> Queries:
        """IoU-aware query selection: the top `num_queries` proposals by their best class logit give the
        reference boxes and (detached) the content; `interm_outputs` holds their predictions (supervised
        with the real labels, as the reference's last aux output)."""
        dec = self.decoder
        anchors, valid = grid_anchors(mem.spatial_shapes, mem.memory.device)
        memory = valid.to(mem.memory.dtype) * mem.memory
        output_memory = dec.enc_output(memory)
        enc_logits = dec.enc_score_head(output_memory)
        enc_coords = dec.enc_bbox_head(output_memory) + anchors
        k = min(self.cfg.num_queries, enc_logits.shape[1])
        topk = torch.topk(enc_logits.max(-1).values, k, dim=1)[1]
        coords = enc_coords.gather(1, topk[..., None].expand(-1, -1, 4))
        logits = enc_logits.gather(1, topk[..., None].expand(-1, -1, enc_logits.shape[-1]))
        content = output_memory.gather(1, topk[..., None].expand(-1, -1, output_memory.shape[-1])).detach()
        ratio = mem.valid_ratios[:, 0]
        boxes = coords.sigmoid()
        interm = {"pred_logits": logits, "pred_boxes": _to_image(boxes, ratio)}
        return Queries(content, _to_image(boxes.detach(), ratio), None, {"interm_outputs": interm})

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """content (B, K, D); reference (B, K, 4) boxes of the unpadded image; position (B, K, D) added
        to the positional query every layer (None: nothing added)."""
        dec = self.decoder
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        ratio = mem.valid_ratios[:, 0]
        ref = _to_canvas(reference, ratio)
        ref_detach, ref_prev = ref.detach(), ref
        out, logits, boxes, hidden = content, [], [], []
        for i, layer in enumerate(dec.decoder.layers):
            query_pos = dec.query_pos_head(ref_detach)
            if position is not None:
                query_pos = query_pos + position
            out = layer(out, ref_detach, mem, query_pos, attn_mask, key_padding)
            delta = dec.dec_bbox_head[i](out)
            refined = (delta + inverse_sigmoid(ref_detach, INV_SIGMOID_EPS)).sigmoid()
            box = refined if i == 0 else (delta + inverse_sigmoid(ref_prev, INV_SIGMOID_EPS)).sigmoid()
            logits.append(dec.dec_score_head[i](out))
            boxes.append(_to_image(box, ratio))
            hidden.append(out)
            ref_prev, ref_detach = refined, refined.detach()
        return layer_outputs(logits, boxes, hidden)

    def denoising_label_book(self) -> nn.Embedding:
        return self.decoder.denoising_class_embed
