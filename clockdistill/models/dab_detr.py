"""DAB-DETR (Liu et al., ICLR 2022) as in IDEA-Research/DAB-DETR: single-scale (C5, or C4-stride
with `dilation`, the DC5 variant), 4-d anchor boxes as queries.

Number for number with the reference: PReLU in every encoder and decoder layer; the encoder scales
its positional encoding by an MLP of the content at each layer; the decoder derives each layer's
positional query from the anchor's sine encoding in (y, x, w, h) order, scales it by
`query_scale` (from the second layer on), modulates its x and y halves by the anchor's width and
height over `ref_anchor_head`'s prediction, and concatenates it per head to the content query
(keys likewise with their positional encoding) for cross-attention; the positional query enters
the cross-attention query only in the first layer; the image's sine encoding uses temperature 20
and no half-cell offset; every decoder output goes through one shared LayerNorm; the box head is
shared by all layers and refines each anchor, the next layer's anchor being the refined box
without its gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.common import MLP, Detector, Memory, Queries, layer_outputs, level_masks, valid_ratio
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.position import sine_box_encoding, sine_grid_encoding
from clockdistill.models.resnet import ResNet
from clockdistill.ops.boxes import inverse_sigmoid

TEMPERATURE = 20.0  # DAB-DETR's image position encoding (pe_temperatureH/W)


class Attention(nn.Module):
    """Multi-head attention whose inputs arrive projected (the reference's MultiheadAttention with
    its input projections removed): queries and keys of width `embed_dim`, values of `vdim`, heads
    of embed_dim / num_heads and vdim / num_heads, then `out_proj`."""

    def __init__(self, embed_dim: int, num_heads: int, vdim: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.scaling = (embed_dim // num_heads) ** -0.5
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """q (B, Lq, E), k (B, Lk, E), v (B, Lk, V); attn_mask (Lq, Lk) or (B * heads, Lq, Lk) and
        key_padding_mask (B, Lk), bool, True = may not attend. Returns (B, Lq, V)."""
        B, Lq, E = q.shape
        Lk, V, h = k.shape[1], v.shape[-1], self.num_heads
        q = (q * self.scaling).reshape(B, Lq, h, E // h).transpose(1, 2).reshape(B * h, Lq, E // h)
        k = k.reshape(B, Lk, h, E // h).transpose(1, 2).reshape(B * h, Lk, E // h)
        v = v.reshape(B, Lk, h, V // h).transpose(1, 2).reshape(B * h, Lk, V // h)
        scores = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.view(B, h, Lq, Lk).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            scores = scores.view(B * h, Lq, Lk)
        weights = F.dropout(scores.softmax(-1), p=self.dropout, training=self.training)
        out = torch.bmm(weights, v).view(B, h, Lq, V // h).transpose(1, 2).reshape(B, Lq, V)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.dropout, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask=pad, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src))))))


class Encoder(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, nheads, ffn, dropout) for _ in range(num_layers))
        self.query_scale = MLP(d, d, d, 2)

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), pad)
        return src


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, first: bool):
        super().__init__()
        self.nheads = nheads
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj"):
            setattr(self, name, nn.Linear(d, d))
        self.self_attn = Attention(d, nheads, d, dropout)
        self.norm1, self.dropout1 = nn.LayerNorm(d), nn.Dropout(dropout)
        for name in (
            "ca_qcontent_proj",
            *(["ca_qpos_proj"] if first else []),
            "ca_kcontent_proj",
            "ca_kpos_proj",
            "ca_v_proj",
            "ca_qpos_sine_proj",
        ):
            setattr(self, name, nn.Linear(d, d))
        self.cross_attn = Attention(2 * d, nheads, d, dropout)
        self.linear1, self.dropout, self.linear2 = nn.Linear(d, ffn), nn.Dropout(dropout), nn.Linear(ffn, d)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = nn.PReLU()
        self.first = first

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], self.nheads, -1)

    def forward(
        self, tgt: Tensor, mem: Memory, query_pos: Tensor, query_sine: Tensor, attn_mask, key_padding
    ) -> Tensor:
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask, key_padding)))
        q, k = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(mem.memory)
        k_pos = self.ca_kpos_proj(mem.pos)
        if self.first:  # the positional query joins the content query only in the first layer
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        q = torch.cat([self._heads(q), self._heads(self.ca_qpos_sine_proj(query_sine))], -1).flatten(2)
        k = torch.cat([self._heads(k), self._heads(k_pos)], -1).flatten(2)
        ca = self.cross_attn(q, k, self.ca_v_proj(mem.memory), key_padding_mask=mem.padding_mask)
        tgt = self.norm2(tgt + self.dropout2(ca))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))


class Decoder(nn.Module):
    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, nheads, ffn, dropout, first=i == 0) for i in range(num_layers))
        self.norm = nn.LayerNorm(d)
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.ref_anchor_head = MLP(d, d, 2, 2)


class DABDETR(Detector):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        d = cfg.d_model
        self.backbone = ResNet(
            cfg.backbone_depth, cfg.backbone_width, cfg.backbone_norm, cfg.dilation, cfg.backbone_frozen_stages
        )
        self.input_proj = nn.Conv2d(self.backbone.out_channels[-1], d, 1)
        self.encoder = Encoder(d, cfg.nheads, cfg.ffn_dim, cfg.dropout, cfg.enc_layers)
        self.decoder = Decoder(d, cfg.nheads, cfg.ffn_dim, cfg.dropout, cfg.dec_layers)
        for part in (self.encoder, self.decoder):  # the reference transformer's xavier initialisation
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        self.class_embed = nn.Linear(d, num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)  # shared by every layer, also for the anchor updates
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        src = self.input_proj(self.backbone(images)[-1])
        (m,) = level_masks(mask, [tuple(src.shape[-2:])])
        pos = sine_grid_encoding(m, self.cfg.d_model, TEMPERATURE, offset=0.0).to(src.dtype).flatten(2).transpose(1, 2)
        pad = m.flatten(1)
        features = src.flatten(2).transpose(1, 2)
        memory = self.encoder(features, pos, pad)
        return Memory(memory, pos, pad, [tuple(src.shape[-2:])], valid_ratio(m)[:, None], features)

    def default_queries(self, mem: Memory) -> Queries:
        B = mem.memory.shape[0]
        anchors = self.refpoint_embed.weight.sigmoid()[None].expand(B, -1, -1)
        return Queries(anchors.new_zeros(B, anchors.shape[1], self.cfg.d_model), anchors)

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
        added to every layer's positional query (the one derived from the anchor)."""
        dec, d = self.decoder, self.cfg.d_model
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        out, anchor, anchors, hidden = content, reference, [reference], []
        for i, layer in enumerate(dec.layers):
            sine = sine_box_encoding(anchor, d // 2, order="yxwh").to(out.dtype)  # (B, K, 2d)
            query_pos = dec.ref_point_head(sine)
            if position is not None:
                query_pos = query_pos + position
            sine = sine[..., :d] * (dec.query_scale(out) if i else 1.0)
            ref_hw = dec.ref_anchor_head(out).sigmoid()  # modulated width / height attention
            sine = torch.cat(
                [
                    sine[..., : d // 2] * (ref_hw[..., 1] / anchor[..., 3]).unsqueeze(-1),
                    sine[..., d // 2 :] * (ref_hw[..., 0] / anchor[..., 2]).unsqueeze(-1),
                ],
                -1,
            )
            out = layer(out, mem, query_pos, sine, attn_mask, key_padding)
            refined = (self.bbox_embed(out) + inverse_sigmoid(anchor)).sigmoid()
            if i < len(dec.layers) - 1:
                anchors.append(refined)
            anchor = refined.detach()
            hidden.append(dec.norm(out))
        logits = [self.class_embed(h) for h in hidden]
        boxes = [(self.bbox_embed(h) + inverse_sigmoid(a)).sigmoid() for h, a in zip(hidden, anchors)]
        return layer_outputs(logits, boxes, hidden)
