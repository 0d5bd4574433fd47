"""The student's side of a distillation step (StudentPass) and the target-aware queries as a
detector's decode inputs (target_queries)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from clockdistill.distill.queries import TargetQueryBuilder
from clockdistill.models.common import Memory, Queries, decoder_layers, split_queries


class StudentPass(nn.Module):
    """The student's side of a distillation step as one module, so that data-parallel training can
    wrap it in DistributedDataParallel (DDP syncs gradients of what runs through a module's
    forward): encoder, decoder on its own queries (with DINO's denoising queries in training) and
    the target-aware ones (and, for DETRDistill, the teacher's queries), and the tokens the memory or
    feature terms compare (memory, + pos with `with_pos`, or the encoder's input `features`; through
    the adapter when widths differ). Returns (memory, tokens or None, own-query output, target-query
    layers or None, teacher-query layers or None)."""

    def __init__(
        self, student: nn.Module, queries: TargetQueryBuilder | None, adapter: nn.Linear | None, tokens: str | None
    ):
        super().__init__()
        self.student, self.queries, self.adapter, self.tokens = student, queries, adapter, tokens
        self.fuse = True  # the student's own and target-aware queries in one decoder pass

    def forward(
        self, images: Tensor, mask: Tensor, qs=None, targets: list[dict] | None = None, prior: Queries | None = None
    ):
        m = self.student
        mem = m.encode(images, mask)
        own, dn = m.add_denoising(m.default_queries(mem), targets)  # DINO: its own denoising queries first
        extra = target_queries(m, self.queries, qs) if qs is not None and qs.size else None
        if extra is not None and self.fuse and extra["reference"].shape[-1] == own.reference.shape[-1]:
            out, target = self._decode_fused(mem, own, extra)
        else:
            out = m.decode(mem, own.content, own.reference, own.position, own.self_attn_mask)
            target = decoder_layers(m.decode(mem, **extra)) if extra is not None else None
        out = m.split_denoising(out, dn)
        out.update(own.outputs)  # a two-stage student's proposals, for its detection loss
        prior_layers = None
        if prior is not None:  # DETRDistill: the teacher's queries through the student's decoder
            prior_layers = decoder_layers(m.decode(mem, prior.content, prior.reference, prior.position))
        tokens = None
        if self.tokens is not None:
            if self.tokens == "memory+pos":
                tokens = mem.memory + mem.pos
            else:
                tokens = mem.features if self.tokens == "features" else mem.memory
            if self.adapter is not None:
                tokens = self.adapter(tokens)
        return mem, tokens, out, target, prior_layers

    def _decode_fused(self, mem_s: Memory, own: Queries, extra: dict[str, Tensor]) -> tuple[dict[str, Any], list]:
        """The student's own queries and the target-aware queries in one decoder pass: concatenated,
        with a self-attention mask that keeps the two sets (and the query groups) apart, so every
        output equals that of two separate passes, for one pass's fixed cost. Returns the default
        queries' output (as `decode`) and the target-aware queries' per-layer predictions. (Only when
        both start from the same kind of reference: a box refining detector's own queries start from
        points, its target-aware ones from boxes, and are then decoded apart.) A DINO student's own
        set holds its denoising queries too, behind their group mask: the target-aware queries see
        none of them and they see no target-aware query."""
        content, reference = own.content, own.reference
        B, Q, K = content.shape[0], content.shape[1], extra["content"].shape[1]
        attn_mask = torch.ones(B, Q + K, Q + K, dtype=torch.bool, device=content.device)
        attn_mask[:, :Q, :Q] = own.self_attn_mask if own.self_attn_mask is not None else False
        attn_mask[:, Q:, Q:] = extra["self_attn_mask"]
        own_pos = own.position if own.position is not None else torch.zeros_like(content)
        position = torch.cat([own_pos, extra["position"].to(own_pos.dtype)], 1)
        out = self.student.decode(
            mem_s,
            torch.cat([content, extra["content"].to(content.dtype)], 1),
            torch.cat([reference, extra["reference"].to(reference.dtype)], 1),
            position,
            attn_mask,
        )
        own_out, target = split_queries(out, Q)
        return own_out, decoder_layers(target)


def target_queries(model: nn.Module, builder: TargetQueryBuilder, qs) -> dict[str, Tensor]:
    """The target-aware queries as `model.decode` inputs: embedded at the model's width, their
    reference the GT box, or its centre for a detector whose queries are points (plain Deformable
    DETR). They never pass through a two-stage detector's proposals."""
    extra = builder.embed(qs, model.cfg.d_model)
    if getattr(model, "target_query_dim", 4) == 2:
        extra = {**extra, "reference": extra["reference"][..., :2]}
    return extra
