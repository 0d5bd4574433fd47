"""D-FINE (Peng et al., ICLR 2025) as in Peterande/D-FINE (src/zoo/dfine): RT-DETR's design with boxes
regressed as distributions over edge offsets (Fine-grained Distribution Refinement).

Number for number with the reference:

- backbone: HGNetV2 (models/hgnetv2.py); stages 1-3 (strides 8, 16, 32), or 2-3 for the N size;
- hybrid encoder: RT-DETR's (one AIFI layer on the last level), its fusion blocks RepNCSPELAN4 (a 1x1
  convolution split in two halves, the second through two CSP layers of RepVGG blocks each followed by
  a 3x3 convolution, the four parts concatenated into a 1x1 convolution), its lateral convolutions
  without activation, its downsampling SCDown (1x1 convolution, then a depthwise stride-2 3x3);
- decoder: the memory is the fused maps (a 1x1 convolution and BatchNorm only where the encoder's width
  differs from the decoder's), IoU-aware query selection as RT-DETR's; post-norm layers whose
  deformable cross-attention (v2's, points per level, no value or output projection) is merged with
  the residual by a Gate (sigmoid gates on the concatenation, LayerNorm); after the first layer a
  `pre_bbox_head` refines the query boxes once (`pre_outputs`, supervised) and these boxes are every
  layer's reference; each layer's box head predicts 4 x (reg_max + 1) logits, added to the previous
  layer's, whose softmax over the non-uniform weighting function W(n) (reg_max, up 0.5, reg_scale)
  gives the four edge distances from the reference box (distance2bbox); the class logits get a
  location quality term from the top-4 probabilities of each edge's distribution (LQE);
- contrastive denoising queries in training, as RT-DETR's.

Each layer's output carries `pred_corners` (the distribution logits) and `ref_points` (the boxes they
are measured from) for the localisation losses (losses/criterion.py: FGL, DDF). Published configs only:
`eval_idx` -1 and `layer_scale` 1 (every layer alike; the reference's wider layers are unused there).
Inputs are padded to a multiple of 32 as RT-DETR's (models/rtdetr.py).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.common import MLP, Detector, layer_outputs
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.hgnetv2 import HGNetV2
from clockdistill.models.presnet import ConvNormLayer
from clockdistill.models.rtdetr import (
    FOCAL_PRIOR,
    INV_SIGMOID_EPS,
    RTDETR,
    CSPRepLayer,
    HybridEncoder,
    MSDeformAttnV2,
    _to_canvas,
    _to_image,
)
from clockdistill.ops.boxes import box_xyxy_to_cxcywh, inverse_sigmoid

LQE_TOPK, LQE_HIDDEN, LQE_LAYERS = 4, 64, 2  # the reference's LQE(4, 64, 2, reg_max)

# -- the encoder's blocks -------------------------------------------------------------------------


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = ConvNormLayer(c1, c3, 1, 1, act="silu")
        self.cv2 = nn.Sequential(CSPRepLayer(c3 // 2, c4, n, 1.0, "silu"), ConvNormLayer(c4, c4, 3, 1, act="silu"))
        self.cv3 = nn.Sequential(CSPRepLayer(c4, c4, n, 1.0, "silu"), ConvNormLayer(c4, c4, 3, 1, act="silu"))
        self.cv4 = ConvNormLayer(c3 + 2 * c4, c2, 1, 1, act="silu")

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).split((self.c, self.c), 1))
        parts.append(self.cv2(parts[-1]))
        parts.append(self.cv3(parts[-1]))
        return self.cv4(torch.cat(parts, 1))


class SCDown(nn.Module):
    def __init__(self, c1: int, c2: int, k: int, s: int):
        super().__init__()
        self.cv1 = ConvNormLayer(c1, c2, 1, 1)
        self.cv2 = ConvNormLayer(c2, c2, k, s, groups=c2)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class DFineHybridEncoder(HybridEncoder):
    @staticmethod
    def input_projection(c: int, d: int) -> nn.Module:
        return nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, d, 1, bias=False)), ("norm", nn.BatchNorm2d(d))]))

    @staticmethod
    def lateral(d: int) -> nn.Module:
        return ConvNormLayer(d, d, 1, 1)

    @staticmethod
    def fusion(d: int, cfg) -> nn.Module:
        return RepNCSPELAN4(2 * d, d, 2 * d, round(cfg.expansion * d // 2), round(3 * cfg.depth_mult))

    @staticmethod
    def downsample(d: int) -> nn.Module:
        return nn.Sequential(SCDown(d, d, 3, 2))


# -- the decoder ----------------------------------------------------------------------------------


class Gate(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(2 * d, 2 * d)
        self.norm = nn.LayerNorm(d)
        nn.init.constant_(self.gate.bias, 0.0)  # the reference's bias_init_with_prob(0.5)
        nn.init.constant_(self.gate.weight, 0.0)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], -1))).chunk(2, -1)
        return self.norm(g1 * x1 + g2 * x2)


class DFineDecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, points: list[int], method: str, offset_scale):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.cross_attn = MSDeformAttnV2(d, len(points), nheads, points, method, offset_scale, projections=False)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d)
        self.linear1, self.dropout3, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt: Tensor, ref: Tensor, mem, query_pos: Tensor, attn_mask, key_padding) -> Tensor:
        q = tgt + query_pos
        sa = self.self_attn(q, q, tgt, attn_mask=attn_mask, key_padding_mask=key_padding, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(sa))
        ca = self.cross_attn(tgt + query_pos, ref, mem.memory, mem.spatial_shapes)
        tgt = self.gateway(tgt, self.dropout2(ca))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3((tgt + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class LQE(nn.Module):
    """Location quality: the class logits plus an MLP of each edge distribution's top-k probabilities
    and their mean."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.k, self.reg_max = LQE_TOPK, reg_max
        self.reg_conf = MLP(4 * (LQE_TOPK + 1), LQE_HIDDEN, 1, LQE_LAYERS)
        nn.init.constant_(self.reg_conf.layers[-1].bias, 0.0)
        nn.init.constant_(self.reg_conf.layers[-1].weight, 0.0)

    def forward(self, scores: Tensor, corners: Tensor) -> Tensor:
        B, Q, _ = corners.shape
        prob = F.softmax(corners.reshape(B, Q, 4, self.reg_max + 1), dim=-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(B, Q, -1))


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor) -> Tensor:
    """W(n), (reg_max + 1,): 0 in the middle, growing as step^i - 1 to +-up x reg_scale on either side,
    +-2 x up x reg_scale at the ends (the reference's, operation for operation)."""
    bound1 = abs(up[0]) * abs(reg_scale)
    bound2 = bound1 * 2
    step = (bound1 + 1) ** (2 / (reg_max - 2))
    left = [-(step**i) + 1 for i in range(reg_max // 2 - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, reg_max // 2)]
    return torch.cat([-bound2, *left, torch.zeros_like(up[0][None]), *right, bound2], 0)


def integral(corners: Tensor, project: Tensor, reg_max: int) -> Tensor:
    """(..., 4 x (reg_max + 1)) logits -> (..., 4) expected edge distances under W(n)."""
    prob = F.softmax(corners.reshape(-1, reg_max + 1), dim=1)
    return F.linear(prob, project.to(prob.dtype)).reshape(*corners.shape[:-1], 4)


def distance2bbox(points: Tensor, distance: Tensor, reg_scale: Tensor) -> Tensor:
    """Reference boxes (cxcywh) and edge distances (left, top, right, bottom, in units of box size /
    reg_scale beyond half the box) -> boxes (cxcywh)."""
    reg_scale = abs(reg_scale)
    x1 = points[..., 0] - (0.5 * reg_scale + distance[..., 0]) * (points[..., 2] / reg_scale)
    y1 = points[..., 1] - (0.5 * reg_scale + distance[..., 1]) * (points[..., 3] / reg_scale)
    x2 = points[..., 0] + (0.5 * reg_scale + distance[..., 2]) * (points[..., 2] / reg_scale)
    y2 = points[..., 1] + (0.5 * reg_scale + distance[..., 3]) * (points[..., 3] / reg_scale)
    return box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], -1))


class FDRDecoder(nn.Module):
    """The reference's TransformerDecoder: the layers and one LQE per layer. (The reference also
    registers its parent's `up` and `reg_scale` here, the same tensors under a second name; they are
    kept once, on the parent.)"""

    def __init__(self, layer: nn.Module, n: int, reg_max: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n))
        self.lqe_layers = nn.ModuleList(LQE(reg_max) for _ in range(n))


class DFINETransformer(nn.Module):
    """The reference's decoder module (its names): input projections, the FDR decoder, query
    selection heads, per-layer class and distribution heads, the pre-box head, `up` and `reg_scale`."""

    def __init__(self, cfg, in_channels: list[int], num_classes: int):
        super().__init__()
        d, L = cfg.d_model, len(in_channels)
        self.reg_max = cfg.reg_max
        self.input_proj = nn.ModuleList(
            nn.Identity()
            if c == d
            else nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, d, 1, bias=False)), ("norm", nn.BatchNorm2d(d))]))
            for c in in_channels
        )
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(cfg.reg_scale)]), requires_grad=False)
        points = list(cfg.level_points) or [cfg.n_points] * L
        layer = DFineDecoderLayer(
            d, cfg.nheads, cfg.ffn_dim, cfg.dropout, points, cfg.cross_attn_method, cfg.offset_scale
        )
        self.decoder = FDRDecoder(layer, cfg.dec_layers, cfg.reg_max)
        if cfg.dn_number > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, d, padding_idx=num_classes)
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(d, d)), ("norm", nn.LayerNorm(d))]))
        self.enc_score_head = nn.Linear(d, num_classes)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(cfg.dec_layers))
        self.pre_bbox_head = MLP(d, d, 4, 3)
        self.dec_bbox_head = nn.ModuleList(MLP(d, d, 4 * (cfg.reg_max + 1), 3) for _ in range(cfg.dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.enc_score_head.bias, FOCAL_PRIOR)
        for head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.constant_(head.layers[-1].weight, 0)
            nn.init.constant_(head.layers[-1].bias, 0)
        for cls_ in self.dec_score_head:
            nn.init.constant_(cls_.bias, FOCAL_PRIOR)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for proj in self.input_proj:
            if isinstance(proj, nn.Sequential):
                nn.init.xavier_uniform_(proj.conv.weight)


class DFINE(RTDETR):
    """RT-DETR's encode and query selection (models/rtdetr.py) on D-FINE's modules; its own decode."""

    def __init__(self, cfg, num_classes: int):
        Detector.__init__(self, cfg, num_classes)
        return_idx = (1, 2, 3) if cfg.num_levels == 3 else (2, 3)
        self.backbone = HGNetV2(
            cfg.hgnet, cfg.backbone_width, cfg.use_lab, return_idx, cfg.backbone_norm, cfg.backbone_frozen_stages
        )
        enc_dim = cfg.encoder_dim or cfg.d_model
        ffn = cfg.encoder_ffn_dim or cfg.ffn_dim
        channels = self.backbone.out_channels
        self.encoder = DFineHybridEncoder(channels, enc_dim, cfg.nheads, ffn, cfg.dropout, cfg.enc_layers, cfg)
        self.decoder = DFINETransformer(cfg, [enc_dim] * len(channels), num_classes)

    def decode(
        self,
        mem,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """As RT-DETR's decode, with Fine-grained Distribution Refinement: every layer's boxes are its
        accumulated edge distributions around the boxes the pre-box head gave after the first layer.
        Each layer also returns `pred_corners` and `ref_points`; `pre_outputs` holds the pre-box
        head's boxes and the first class head's logits on them."""
        dec = self.decoder
        reg_max, reg_scale = dec.reg_max, dec.reg_scale
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        ratio = mem.valid_ratios[:, 0]
        ref_detach = _to_canvas(reference, ratio).detach()
        project = weighting_function(reg_max, dec.up, reg_scale)
        out, out_detach, corners_prev = content, 0, 0
        logits, boxes, hidden, corners_all, refs = [], [], [], [], []
        for i, layer in enumerate(dec.decoder.layers):
            query_pos = dec.query_pos_head(ref_detach).clamp(min=-10, max=10)
            if position is not None:
                query_pos = query_pos + position
            out = layer(out, ref_detach, mem, query_pos, attn_mask, key_padding)
            if i == 0:
                pre_boxes = (dec.pre_bbox_head(out) + inverse_sigmoid(ref_detach, INV_SIGMOID_EPS)).sigmoid()
                pre_logits = dec.dec_score_head[0](out)
                ref_initial = pre_boxes.detach()
            corners = dec.dec_bbox_head[i](out + out_detach) + corners_prev
            box = distance2bbox(ref_initial, integral(corners, project, reg_max), reg_scale)
            logits.append(dec.decoder.lqe_layers[i](dec.dec_score_head[i](out), corners))
            boxes.append(_to_image(box, ratio))
            hidden.append(out)
            corners_all.append(corners)
            refs.append(_to_image(ref_initial, ratio))
            corners_prev, ref_detach, out_detach = corners, box.detach(), out.detach()
        result = layer_outputs(logits, boxes, hidden)
        for layer_out, c, r in zip([*result["aux_outputs"], result], corners_all, refs):
            layer_out.update(pred_corners=c, ref_points=r)
        result["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": _to_image(pre_boxes, ratio)}
        result.update(fdr_up=dec.up, fdr_reg_scale=reg_scale)  # W(n) for the localisation losses
        return result
