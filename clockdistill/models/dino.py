"""DINO (Zhang et al., ICLR 2023) as in IDEA-Research/DINO (4-scale, ResNet backbones).

Number for number with the reference's defaults (two_stage_type standard, shared decoder heads,
separate two-stage heads, embed_init_tgt, decoder_sa_type sa, dropout 0):

- encoder: Deformable DETR's (models/deformable_detr.py), but the image position encoding without
  the -0.5 offset and at temperature 20 (PositionEmbeddingSineHW);
- mixed query selection: every memory token scores a proposal (`enc_output`, `enc_out_class_embed`,
  `enc_out_bbox_embed` on Deformable DETR's per-token boxes); the top `num_queries` by their best
  class logit give the anchors (detached), the content queries are learned (`tgt_embed`); the
  selected proposals are supervised with the real labels (`interm_outputs`);
- decoder: Deformable DETR's decoder layers, with the positional query recomputed every layer from
  the 4-d reference box: `ref_point_head(sine(box))`, y before x, temperature 10000, and a final
  `norm` on every layer's output; one class head and one box head shared by all layers;
- look forward twice: each layer refines the box it was given, the next layer receives the refined
  box without its gradient, and the box a layer predicts is its refinement of the previous layer's
  refined box *with* that box's gradient, so layer i's box loss also trains layer i-1's box head;
- contrastive denoising in training (models/denoising.py): noised GT queries from the trainable
  label book `label_enc`, decoded in the same pass as the matching queries, before them, behind the
  group attention mask; their outputs go to the criterion as `dn`.

Initialisation as the reference: xavier on every matrix of the transformer (tgt_embed included),
deformable attention's own, level embedding N(0, 1), focal prior on the class heads, zero last box
layer, label book N(0, 1). Parameter names are the reference's without `transformer.` and
`backbone.0.body.` (weights/layouts.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clockdistill.models.common import MLP, Memory, Queries, layer_outputs
from clockdistill.models.common import self_attention_masks as _sa_masks
from clockdistill.models.deformable_detr import FOCAL_PRIOR, DecoderLayer, DeformableEncoderDetector
from clockdistill.models.denoising import ContrastiveDenoising
from clockdistill.models.invariance import masked_topk_scores
from clockdistill.models.position import sine_box_encoding
from clockdistill.ops.boxes import inverse_sigmoid

INV_SIGMOID_EPS = 1e-3  # DINO's util.misc.inverse_sigmoid


class DinoDecoder(nn.Module):
    """Layers `layers.{i}`, the final `norm` and `ref_point_head`, as the reference names them."""

    padding_invariant = False  # positional queries from image-relative boxes (models/invariance.py)

    def __init__(self, d: int, ffn: int, dropout: float, n_levels: int, nheads: int, n_points: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d, ffn, dropout, n_levels, nheads, n_points) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.d_model = d

    def forward(
        self,
        content: Tensor,
        reference: Tensor,
        mem: Memory,
        box_heads: Sequence[nn.Module],
        attn_mask: Tensor | None = None,
        key_padding: Tensor | None = None,
        position: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """content (B, Q, D); reference (B, Q, 4) boxes in [0, 1]; box_heads one per layer (DINO
        shares one module); position (B, Q, D) added to the positional query of every layer (the
        target-aware queries' box code; None for the detector's own queries). Returns every layer's
        normed output (B, Q, D) and the references [reference, refined box of layer 0, ..., of the
        last layer], the refined boxes with their gradient."""
        ratios = mem.valid_ratios.repeat(1, 1, 2)[:, None]  # (B, 1, L, 4)
        # the positional query: from boxes relative to the canvas (the reference), or to the image
        pos_ratio = torch.ones_like(ratios[:, :, 0]) if self.padding_invariant else ratios[:, :, 0]
        out, ref = content, reference
        hidden, refs = [], [reference]
        for layer, head in zip(self.layers, box_heads):
            ref_input = ref[:, :, None] * ratios
            query_pos = self.ref_point_head(sine_box_encoding(ref * pos_ratio, self.d_model // 2, order="yxwh"))
            if position is not None:
                query_pos = query_pos + position
            out = layer(out, query_pos, ref_input, mem, attn_mask, key_padding)
            refined = (head(out) + inverse_sigmoid(ref, INV_SIGMOID_EPS)).sigmoid()
            ref = refined.detach()
            refs.append(refined)
            hidden.append(self.norm(out))
        return hidden, refs


def look_forward_twice(
    hidden: list[Tensor], refs: list[Tensor], class_heads: Sequence[nn.Module], box_heads: Sequence[nn.Module]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer i: logits class_head_i(h_i) and box sigmoid(box_head_i(h_i) + inverse_sigmoid(refs[i])),
    refs[i] the (undetached) box layer i-1 refined: DINO's predictions."""
    logits, boxes = [], []
    for h, ref, class_head, box_head in zip(hidden, refs, class_heads, box_heads):
        logits.append(class_head(h))
        boxes.append((box_head(h) + inverse_sigmoid(ref, INV_SIGMOID_EPS)).sigmoid())
    return logits, boxes


class DINO(ContrastiveDenoising, DeformableEncoderDetector):
    pos_temperature, pos_offset = 20.0, 0.0

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        d, L = cfg.d_model, cfg.num_levels
        labelbook = cfg.dn_labelbook or num_classes
        if labelbook < num_classes:
            raise ValueError(f"model.dn_labelbook: {labelbook} rows cannot hold {num_classes} classes")
        self._build_encoder(cfg)
        self.decoder = DinoDecoder(d, cfg.ffn_dim, cfg.dropout, L, cfg.nheads, cfg.n_points, cfg.dec_layers)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
        self._reset_transformer([self.encoder, self.decoder, self.tgt_embed, self.enc_output])
        nn.init.normal_(self.level_embed)
        self.label_enc = nn.Embedding(labelbook + 1, d)
        self.class_embed, self.bbox_embed = nn.Linear(d, num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(self.class_embed.bias, FOCAL_PRIOR)
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)
        self.enc_out_class_embed = copy.deepcopy(self.class_embed)
        self.enc_out_bbox_embed = copy.deepcopy(self.bbox_embed)
        self._reset_input_proj()

    def default_queries(self, mem: Memory) -> Queries:
        """Mixed query selection: anchors from the best-scoring proposals (by their best class logit),
        content from `tgt_embed`; `interm_outputs` holds the selected proposals' predictions."""
        B = mem.memory.shape[0]
        output_memory, proposals = self._proposals(mem)
        enc_logits = self.enc_out_class_embed(output_memory)
        enc_coords = self.enc_out_bbox_embed(output_memory) + proposals  # logit space
        k = min(self.cfg.num_queries, enc_logits.shape[1])
        topk = torch.topk(masked_topk_scores(enc_logits.max(-1)[0], mem.padding_mask, self), k, dim=1)[1]
        coords = torch.gather(enc_coords, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
        logits = torch.gather(enc_logits, 1, topk.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        content = self.tgt_embed.weight[:k][None].expand(B, -1, -1)
        interm = {"pred_logits": logits, "pred_boxes": coords.sigmoid()}
        return Queries(content, coords.detach().sigmoid(), None, {"interm_outputs": interm})

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """content (B, K, D); reference (B, K, 4) boxes in [0, 1]; position (B, K, D) added to the
        positional query the decoder derives from the box every layer (None: nothing added)."""
        attn_mask, key_padding = _sa_masks(self_attn_mask, padding_mask, self.cfg.nheads)
        heads = [self.bbox_embed] * len(self.decoder.layers)
        hidden, refs = self.decoder(content, reference, mem, heads, attn_mask, key_padding, position)
        logits, boxes = look_forward_twice(hidden, refs[:-1], [self.class_embed] * len(heads), heads)
        return layer_outputs(logits, boxes, hidden)

    def denoising_label_book(self) -> nn.Embedding:
        return self.label_enc
