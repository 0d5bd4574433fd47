"""DINO (Zhang et al., ICLR 2023) as in IDEA-Research/DINO: the decoder and its box refinement.

So far: the decoder (Deformable DETR's decoder layers, with the positional query recomputed every
layer from the 4-d reference box: `ref_point_head(sine(box))`, y before x, temperature 10000) and
"look forward twice": each layer refines the box it was given, the next layer receives the refined
box without its gradient, and the box a layer predicts is its refinement of the previous layer's
refined box *with* that box's gradient, so layer i's box loss also trains layer i-1's box head.
Denoising queries: clockdistill/models/denoising.py. The detector itself (mixed query selection,
presets, import) is still to come.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from clockdistill.models.common import MLP, Memory
from clockdistill.models.deformable_detr import DecoderLayer
from clockdistill.models.position import sine_box_encoding
from clockdistill.ops.boxes import inverse_sigmoid

INV_SIGMOID_EPS = 1e-3  # DINO's util.misc.inverse_sigmoid


class DinoDecoder(nn.Module):
    """Layers `layers.{i}`, the final `norm` and `ref_point_head`, as the reference names them."""

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
    ) -> tuple[list[Tensor], list[Tensor]]:
        """content (B, Q, D); reference (B, Q, 4) boxes in [0, 1]; box_heads one per layer (DINO
        shares one module). Returns every layer's normed output (B, Q, D) and the references
        [reference, refined box of layer 0, ..., of the last layer], the refined boxes with their
        gradient."""
        ratios = mem.valid_ratios.repeat(1, 1, 2)[:, None]  # (B, 1, L, 4)
        out, ref = content, reference
        hidden, refs = [], [reference]
        for layer, head in zip(self.layers, box_heads):
            ref_input = ref[:, :, None] * ratios
            query_pos = self.ref_point_head(sine_box_encoding(ref_input[:, :, 0], self.d_model // 2, order="yxwh"))
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
