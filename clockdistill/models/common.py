"""What every detector shares: the memory and query records, the MLP head, the feature-level masks,
and `Detector`, the interface the training loop, the distiller and the exporters use.

    mem = model.encode(images, mask)          # Memory: encoder output and its geometry
    queries = model.default_queries(mem)      # the detector's own queries (learned, or proposals)
    out = model.decode(mem, queries.content, queries.reference, queries.position)
    out = model(images, mask)                 # all three, plus the memory and query-side outputs
    out = model(images, mask, targets=targets)  # in training: DINO adds its denoising queries

A detector with training-only queries (DINO's denoising) implements `add_denoising` (prepends them
to its own queries, with the self-attention mask that keeps the two apart) and `split_denoising`
(cuts their outputs off again, under `dn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.ops.host import small_tensor


class MLP(nn.Module):
    """Linear layers with ReLU between them (`layers.{i}` as in the reference implementations)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class LayerStack(nn.Module):
    """A stack of layers under `layers.{i}`, the reference implementations' parameter names."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


@dataclass
class Memory:
    """Encoder output and the geometry needed to attend to it (or to rebuild its per-level grids)."""

    memory: Tensor  # (B, N, D), N = sum_l H_l * W_l, levels in order
    pos: Tensor  # (B, N, D) position (+ level) encoding of each token
    padding_mask: Tensor  # (B, N) True on padded tokens
    spatial_shapes: list[tuple[int, int]]  # [(H_l, W_l)] per level
    valid_ratios: Tensor  # (B, L, 2) unpadded fraction (w, h) of each level
    features: Tensor | None = None  # (B, N, D) the encoder's input tokens (the projected backbone maps)

    @property
    def level_start_index(self) -> list[int]:
        starts, total = [], 0
        for h, w in self.spatial_shapes:
            starts.append(total)
            total += h * w
        return starts


@dataclass
class Queries:
    """A decoder's query inputs: content (B, Q, D), reference (B, Q, 2) points or (B, Q, 4) boxes
    (normalised, cxcywh), position (B, Q, D) or None, outputs made while building them (a
    two-stage detector's proposal predictions, `enc_outputs` / `interm_outputs`), and the
    self-attention mask among them (Q, Q) bool, True = blocked, or None."""

    content: Tensor
    reference: Tensor
    position: Tensor | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    self_attn_mask: Tensor | None = None


def level_masks(mask: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """The image padding mask (B, H, W) resampled (nearest) to every feature level."""
    return [F.interpolate(mask[None].float(), size=s).to(torch.bool)[0] for s in shapes]


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, 2): the unpadded fraction (w, h) of a level's grid."""
    _, H, W = mask.shape
    return torch.stack([(~mask[:, 0, :]).sum(1).float() / W, (~mask[:, :, 0]).sum(1).float() / H], -1)


def self_attention_masks(attn_mask: Tensor | None, padding_mask: Tensor | None, nheads: int):
    """Masks for decoder self-attention over a query group: attn_mask (Q, Q) or per image
    (B, Q, Q) bool (True = may not attend) -> per head (B * nheads, Q, Q); padding_mask (B, Q)
    True on padded slots. A row whose every key is masked would give NaN: an image whose slots are
    all padding keeps them visible (its outputs are ignored anyway)."""
    if padding_mask is not None:
        padding_mask = padding_mask & ~padding_mask.all(-1, keepdim=True)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.repeat_interleave(nheads, 0)
    return attn_mask, padding_mask


class Detector(nn.Module):
    """Base of the detector families: subclasses implement `encode`, `default_queries` and `decode`.
    `target_query_dim` is the reference a target-aware query gives this detector: 4 (the GT box) for
    every detector that refines boxes or starts from anchors, 2 (its centre) for plain Deformable DETR,
    whose queries are points."""

    target_query_dim = 4

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (resolve it from the data set first)")
        self.cfg, self.num_classes = cfg, num_classes

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        if mode and self.cfg.frozen_bn:  # running statistics only: the same normalisation for any batch split
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):  # also SyncBatchNorm
                    m.eval()
        return self

    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        raise NotImplementedError

    def default_queries(self, mem: Memory) -> Queries:
        raise NotImplementedError

    def decode(
        self,
        mem: Memory,
        content: Tensor,
        reference: Tensor,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """Decode a query group; returns pred_logits (B, Q, C), pred_boxes (B, Q, 4) of the last layer
        and aux_outputs [{pred_logits, pred_boxes}] of the others."""
        raise NotImplementedError

    def add_denoising(self, queries: Queries, targets: list[dict] | None) -> tuple[Queries, Any]:
        """Training-only queries added to the detector's own (none here): (queries, state for
        `split_denoising`)."""
        return queries, None

    def split_denoising(self, out: dict[str, Any], state: Any) -> dict[str, Any]:
        return out

    def forward(
        self,
        images: Tensor,
        mask: Tensor,
        extra_queries: dict[str, Tensor] | None = None,
        targets: list[dict] | None = None,
    ) -> dict[str, Any]:
        """images (B, 3, H, W), mask (B, H, W) True on padding; targets (training) for the training-
        only queries of a detector that has them. Returns
        pred_logits (B, Q, C) class logits (sigmoid, no background class);
        pred_boxes (B, Q, 4) normalised cxcywh of the unpadded image;
        aux_outputs: [{pred_logits, pred_boxes}] for every decoder layer but the last;
        enc_outputs (two-stage detectors): the proposals' {pred_logits, pred_boxes};
        memory (B, N, D), memory_pos (B, N, D), memory_padding_mask (B, N),
        spatial_shapes (L, 2) long, level_start_index (L,) long;
        extra: the same prediction keys for `extra_queries` (keys content, reference and optional
        position, self_attn_mask, padding_mask; see `decode`), decoded in a separate pass;
        dn (DINO in training): the denoising queries' outputs, pairs and group count.
        """
        mem = self.encode(images, mask)
        queries, dn = self.add_denoising(self.default_queries(mem), targets)
        out = self.decode(mem, queries.content, queries.reference, queries.position, queries.self_attn_mask)
        out = self.split_denoising(out, dn)
        out.update(queries.outputs)
        out.update(
            memory=mem.memory,
            memory_pos=mem.pos,
            memory_padding_mask=mem.padding_mask,
            spatial_shapes=small_tensor(mem.spatial_shapes, images.device, torch.long),
            level_start_index=small_tensor(mem.level_start_index, images.device, torch.long),
        )
        if extra_queries is not None:
            out["extra"] = self.decode(mem, **extra_queries)
        return out


LAYER_KEYS = ("pred_logits", "pred_boxes", "hidden", "pred_corners", "ref_points")  # (the last two: D-FINE's)


def layer_outputs(logits: list[Tensor], boxes: list[Tensor], hidden: list[Tensor]) -> dict[str, Any]:
    """Per-layer predictions (first to last) as a decode output: pred_logits, pred_boxes and `hidden`
    (B, Q, D), the decoder output the class head reads (the query embeddings DETRDistill weighs)."""
    layers = [{"pred_logits": c, "pred_boxes": b, "hidden": h} for c, b, h in zip(logits, boxes, hidden)]
    return {**layers[-1], "aux_outputs": layers[:-1]}


def decoder_layers(out: dict[str, Any]) -> list[dict[str, Tensor]]:
    """A decode output's per-layer dicts, first to last."""
    return [*out["aux_outputs"], {k: out[k] for k in LAYER_KEYS if k in out}]


def split_queries(out: dict[str, Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A decode output over two query sets, the first `n` queries then the rest -> a decode output of
    each: per-layer keys and per-query side outputs (dict values: D-FINE's `pre_outputs`) cut along
    the query axis, other keys (tensors not per query) in both."""
    layers = decoder_layers(out)
    parts = []
    for cut in (slice(None, n), slice(n, None)):
        own = [{k: v[:, cut] for k, v in layer.items()} for layer in layers]
        part = {k: v for k, v in out.items() if k not in (*LAYER_KEYS, "aux_outputs")}
        part.update({k: {kk: vv[:, cut] for kk, vv in v.items()} for k, v in part.items() if isinstance(v, dict)})
        part.update(own[-1], aux_outputs=own[:-1])
        parts.append(part)
    return parts[0], parts[1]
