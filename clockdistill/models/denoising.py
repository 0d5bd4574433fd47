"""DINO's contrastive denoising queries (CDN): noised copies of the ground truth that the decoder
learns to reconstruct (positives) or to reject (negatives), in groups that cannot see each other.

Number for number with the reference (IDEA-Research/DINO, `prepare_for_cdn`):

- groups: `dn_number` is doubled; at 100 or more it becomes a query budget, `2 dn_number // (2 max_gt)`
  groups; below 100 it is the group count itself; one group when no image has a box.
- each group holds, per image, `max_gt` positive slots then `max_gt` negative slots (an image with
  fewer boxes leaves padding slots: zero content, zero reference);
- labels: each query's label is replaced by a uniformly drawn class with probability
  `label_noise_ratio / 2` (the draw may return the same class);
- the random draws are the reference's, in its order (label uniforms, the chosen labels' classes,
  box signs, box magnitudes), so one seed gives both implementations the same queries;
- boxes: every corner (x0, y0, x1, y1) moves by `box_noise_scale * u * (w/2 or h/2)` with a random
  sign, u in [0, 1) for positives and [1, 2) for negatives, then is clamped to the image;
- the attention mask (True = may not attend): matching queries see no denoising query; a group sees
  itself and the matching queries, never another group.

The queries' content is `label_embedding(label)` (the detector's trainable label book); their
reference is `inverse_sigmoid(box)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clockdistill.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from clockdistill.ops.host import small_tensor


@dataclass
class DenoisingQueries:
    content: Tensor  # (B, pad_size, d) label embeddings of the noised labels; zeros on padding slots
    reference: Tensor  # (B, pad_size, 4) inverse_sigmoid of the noised boxes; zeros on padding slots
    labels: Tensor  # (B, pad_size) noised label per slot, -1 on padding
    boxes: Tensor  # (B, pad_size, 4) noised boxes (cx, cy, w, h) in [0, 1]; zeros on padding
    gt_index: Tensor  # (B, pad_size) the image's GT a slot was made from, -1 on padding
    positive: Tensor  # (B, pad_size) bool: a positive slot holding a GT (the reconstruction targets)
    attn_mask: Tensor  # (pad_size + num_queries,) * 2, bool, True = blocked
    groups: int
    max_gt: int
    counts: tuple[int, ...]  # GT boxes per image (host values: the loss's pairs without a host read)

    @property
    def pad_size(self) -> int:
        return 2 * self.groups * self.max_gt


def denoising_groups(dn_number: int, max_gt: int) -> int:
    """How many positive+negative groups a batch whose largest image has `max_gt` boxes gets."""
    n = dn_number * 2
    if max_gt == 0:
        return 1
    if n >= 100:
        n = n // (max_gt * 2)
    elif n < 1:
        n = 1
    return max(n, 1)


def denoising_attention_mask(groups: int, max_gt: int, num_queries: int, device=None) -> Tensor:
    """(pad + num_queries)^2 bool mask, True = blocked: matching queries never see the denoising part,
    and each group of 2 max_gt slots sees only itself and the matching queries."""
    pad = 2 * groups * max_gt
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    block = 2 * max_gt
    for g in range(groups):
        rows = slice(g * block, (g + 1) * block)
        mask[rows, :pad] = True
        mask[rows, g * block : (g + 1) * block] = False
    return mask


def noised_boxes(boxes: Tensor, negative: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """(N, 4) cxcywh boxes with DINO's corner noise: within scale * half-size for positives, between
    one and two times that for negatives (`negative` (N,) bool), random sign, clamped to [0, 1]."""
    if scale <= 0 or len(boxes) == 0:
        return boxes.clone()
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:] / 2], dim=1)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    part = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    part = (part + negative.to(boxes.dtype).unsqueeze(1)) * sign
    xyxy = (xyxy + part * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(xyxy)


def flipped_labels(labels: Tensor, ratio: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Each label replaced, with probability ratio / 2, by a class drawn uniformly from num_classes."""
    if ratio <= 0 or len(labels) == 0:
        return labels.clone()
    # the reference's draws, in its order: one uniform per label, then one class per chosen label
    chosen = torch.nonzero(torch.rand(labels.shape, generator=generator, device=labels.device) < ratio * 0.5)
    out = labels.clone()
    out[chosen[:, 0]] = torch.randint(0, num_classes, (len(chosen),), generator=generator, device=labels.device)
    return out


def contrastive_denoising_queries(
    targets: list[dict[str, Tensor]],
    label_embedding: nn.Embedding,
    num_queries: int,
    num_classes: int,
    dn_number: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 0.4,
    generator: torch.Generator | None = None,
) -> DenoisingQueries:
    """The denoising queries of one training batch (targets: `labels` (n,), `boxes` (n, 4) cxcywh
    normalised)."""
    device = label_embedding.weight.device
    counts = [len(t["labels"]) for t in targets]
    batch, max_gt = len(targets), max(counts, default=0)
    groups = denoising_groups(dn_number, max_gt)
    pad = 2 * groups * max_gt
    labels = torch.full((batch, pad), -1, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, pad, 4, device=device)
    gt_index = torch.full((batch, pad), -1, dtype=torch.long, device=device)
    positive = torch.zeros(batch, pad, dtype=torch.bool, device=device)
    if max_gt:
        # one row per (group, positive/negative, image, box), in the reference's order of draws
        image = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)]).to(device)
        local = torch.cat([torch.arange(n) for n in counts]).to(device)
        gt_labels = torch.cat([t["labels"].to(device).long() for t in targets])
        gt_boxes = torch.cat([t["boxes"].to(device).float() for t in targets])
        copies = 2 * groups
        image_r, local_r = image.repeat(copies), local.repeat(copies)
        block = torch.arange(copies, device=device).repeat_interleave(len(gt_labels))  # 2g: positives, 2g+1: negatives
        negative = block % 2 == 1
        noisy_labels = flipped_labels(gt_labels.repeat(copies), label_noise_ratio, num_classes, generator)
        noisy_boxes = noised_boxes(gt_boxes.repeat(copies, 1), negative, box_noise_scale, generator)
        slot = block * max_gt + local_r
        labels[image_r, slot] = noisy_labels
        boxes[image_r, slot] = noisy_boxes
        gt_index[image_r, slot] = local_r
        positive[image_r, slot] = ~negative
    filled = (labels >= 0)[..., None]
    # every slot computed, the unfilled ones 0 (no host read of which are filled)
    content = torch.where(filled, label_embedding(labels.clamp(min=0)), 0.0)
    reference = torch.where(filled, inverse_sigmoid(boxes, eps=1e-3), 0.0)  # DINO's eps
    return DenoisingQueries(
        content=content,
        reference=reference,
        labels=labels,
        boxes=boxes,
        gt_index=gt_index,
        positive=positive,
        attn_mask=denoising_attention_mask(groups, max_gt, num_queries, device),
        groups=groups,
        max_gt=max_gt,
        counts=tuple(counts),
    )


def denoising_indices(queries: DenoisingQueries) -> list[tuple[Tensor, Tensor]]:
    """Per image, (positive slot indices, the GT each reconstructs): the fixed pairs of the denoising
    loss, group by group (the reference's `dn_pos_idx`)."""
    out, device, step = [], queries.positive.device, 2 * queries.max_gt
    for n in queries.counts:  # the positive slots are 2g * max_gt + j, j < the image's count: known on the host
        slots = [g * step + j for g in range(queries.groups) for j in range(n)]
        out.append(
            (small_tensor(slots, device, torch.long), small_tensor(list(range(n)) * queries.groups, device, torch.long))
        )
    return out


class ContrastiveDenoising:
    """Detector mixin (DINO, RT-DETR): the denoising queries decoded in the same pass as the matching
    queries, before them, behind the group attention mask, and their outputs cut off again under `dn`.
    The detector gives its trainable label book (`denoising_label_book`) and cfg.dn_*."""

    def denoising_label_book(self) -> nn.Embedding:
        raise NotImplementedError

    def add_denoising(self, queries, targets: list[dict] | None):
        """In training with targets: (denoising + matching queries, the DenoisingQueries)."""
        from clockdistill.models.common import Queries

        if not (self.training and targets is not None and self.cfg.dn_number > 0):
            return queries, None
        dn = contrastive_denoising_queries(
            targets,
            self.denoising_label_book(),
            queries.content.shape[1],
            self.num_classes,
            self.cfg.dn_number,
            self.cfg.dn_label_noise,
            self.cfg.dn_box_noise,
        )
        if dn.pad_size == 0:  # no box in the batch: nothing to denoise
            return queries, None
        both = Queries(
            torch.cat([dn.content.to(queries.content.dtype), queries.content], 1),
            torch.cat([dn.reference.sigmoid().to(queries.reference.dtype), queries.reference], 1),
            None,
            queries.outputs,
            self_attn_mask=dn.attn_mask,
        )
        return both, dn

    def split_denoising(self, out: dict, dn: DenoisingQueries | None) -> dict:
        """The decode output of denoising + matching queries -> the matching queries' output, with
        the denoising queries' under `dn` ({outputs, indices, groups}) for the criterion."""
        from clockdistill.models.common import split_queries

        if dn is None:
            return out
        noised, result = split_queries(out, dn.pad_size)
        result["dn"] = {"outputs": noised, "indices": denoising_indices(dn), "groups": dn.groups}
        return result
